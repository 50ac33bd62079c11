"""Flow-matching variants as small recipes on the core (`jaxgen.flow`; spec §2, §7 "plug-ins"):

    source      SourceFM: learned / fitted / chi-sphere / directionally pruned sources, norm alignment
    blockwise   Blockwise FM: K time segments, one velocity net each, exact switches at the edges
    vecor       VeCoR: a two-sided contrastive velocity regulariser (shuffled or perturbed negatives)
    transition  Transition Matching (DTM): a backbone + FM head sampling each transition's difference
    latent      Latent FM: an MLP autoencoder trained here, FM on its unit-variance latents

Each module gives a frozen, hashable spec, `init`, `loss(params, spec, batch, key) -> (loss,
metrics)` (the train loop's loss signature) and a sampler; all pure and jit-able.
"""
from jaxgen.flow.variants import blockwise, latent, source, transition, vecor

__all__ = ["blockwise", "latent", "source", "transition", "vecor"]
