"""The stages of a run, each a function of a `RunContext` and a `Workdir` (spp_jax.run chains them):

dense     the dense task model: pretrained weights, prepared by the task      (stages.dense)
search    the SPP path: masks only, weights frozen, path points + resume      (stages.search)
extract   the configured targets sliced into smaller models                   (stages.extract)
finetune  fine-tune each extracted model, then measure metric and throughput  (stages.finetune)
"""
