"""Ray clusters: experiments submitted to one as Ray jobs (`submission`: `cvlab submit`, `cvlab jobs`), and a
local cluster with an MLflow server (`local`: `cvlab cluster local`)."""
