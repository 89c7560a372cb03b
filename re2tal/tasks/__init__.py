"""The tasks re2tal trains, one module each, each a `re2tal.training.task.Task` that the shared
driver and worker loop are handed: `localization` (`re2tal train`), `features` (`re2tal train`
with `data.features`: the head alone), `finetune` (`re2tal finetune`). `mlmodel` is what every
finished run logs to MLflow (its model) and how a model URI loads again; `predict` and `extract`
are the batch jobs. Adding a task touches its module, the CLI and the README only."""
