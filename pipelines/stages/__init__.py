"""Stage kinds (one module each) and the Ray glue they share.

Deliberately empty: Ray workers import stage modules by name (a decode task imports
`pipelines.stages.image_batches`), and an import here would pull every stage and torch into each
of them. The registry of kinds is `pipelines.stages.registry.STAGE_KINDS`.
"""
