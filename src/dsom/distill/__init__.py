"""DSoM stage 2: teacher selection (policy and heuristics), distillation losses, the distiller."""
