"""mmdlm: multimodal masked-diffusion language models (LLaDA-V family).

The repository's top-level folders install as one package (pyproject's `package-dir`), so each
folder's import name is `mmdlm.<folder>`:

    mmdlm/     -> mmdlm            model, multimodal, diffusion loss, sampler, cache, configs
    encoders/  -> mmdlm.encoders   vision towers, projector, image processing
    data/      -> mmdlm.data       demo world, LLaVA JSON, shards, tokenizer, template, collator
    train/     -> mmdlm.train      DeepSpeed training, checkpoints, export
    infer/     -> mmdlm.infer      answering, evaluation, benchmarks

The design card keeps the folders at the top level; the mapping keeps generic names such as
`data` and `train` out of site-packages.
"""
