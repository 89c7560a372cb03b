"""The tasks re2tal trains, one module each, each a `re2tal.training.task.Task` that the shared
driver and worker loop are handed: `localization` (`re2tal train`), `finetune` (`re2tal finetune`).
Adding one touches its module, the CLI and the README only."""
