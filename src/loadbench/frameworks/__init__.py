"""Frameworks other than PyTorch, trained side by side with it from the same stores.

`keras_run.KerasRun` is Keras 3 on TensorFlow, with the shape of `training.loop.Run` (`fit`,
`predict`, `history`, `compile_time_s`), so the bench and `loadbench train --framework keras`
(`keras_train.py`) use it as they use `Run`. Its models (`keras_models.py`) are the torch
models' networks, weight for weight; its optimizers and schedules (`keras_optim.py`) compute
torch's steps, and what would not is refused; its input (`keras_data.py`) is a `tf-data`
store's own tf.data pipeline, or loadbench's loader wrapped in tf.data. TensorFlow is imported
(`tf_runtime.py`) when a run starts, never by `import loadbench` or `loadbench --help`.
"""
