"""Commands built on the library that are not training itself: benchmarks (:mod:`.bench`), the
memory planner (:mod:`.plan`) and the latent-space commands (:mod:`.latent_cli`)."""
