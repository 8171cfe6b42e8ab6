"""Pure compute for anomaly synthesis (Perlin masks, object foreground masks, blending): plain
numpy and torch, no Ray; the Ray glue is pipelines/stages/synthesize.py. `config` holds the
parameters a job spec sets, torch-free."""
