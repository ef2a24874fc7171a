"""Block-parallel segmentation on dask.distributed: the block engine's boxes as dask tasks.

:mod:`.scheduler` connects to a cluster (``local:N``, ``tcp://HOST:PORT`` or a scheduler
file); :mod:`.records` keeps, inside each output store, the settings of the run and which
boxes are done, so a run can resume; :mod:`.tasks` holds what runs on a worker (the model,
loaded once per worker, and one box at a time); :mod:`.run` builds the task graph, shows
progress and returns the summary. Nothing here is imported by the compute layers below it.
"""
