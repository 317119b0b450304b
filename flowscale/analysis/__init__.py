"""Analysis of a flow and its run, beside the training pipeline: the linear-flow bound
(:mod:`.bound`), latent-space arithmetic (:mod:`.latent`), per-step log-det health statistics
(:mod:`.lipschitz`) and the record of which samples each step trained on (:mod:`.audit`)."""
