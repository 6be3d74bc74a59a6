"""The update job: replay sampler, trainer, promotion gate and the job entry points."""
