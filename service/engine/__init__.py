"""The single-writer edit engine (``engine.EditEngine``) and its parts, one concern per module:

    engine.py     EditEngine: construction, the job queue and writer thread, submit_*, generate
    errors.py     EngineError and its kin (each an HTTP status)
    locking.py    RWLock: generation reads, a weight swap writes
    replay.py     log -> weights: the replay at start, the sync after an uncertain write, log checks
    snapshots.py  editor state snapshots and served-weight checkpoints (faster starts)
    edits.py      EditSpec and the edit job (validate, propose, guard, log, apply, commit, record)
    take.py       the take check and its strengthening steps (TakeReport)
    rollback.py   the rollback job
    scoring.py    teacher-forced passes and greedy ids on the served weights
    probes.py     probes and the probe report (ProbeReport)
"""
from .edits import EditSpec
from .engine import GREEDY_BELOW, EditEngine
from .errors import (BaseModelMismatch, Conflict, EngineError, InvalidEdit, InvalidRequest, LogSettingsMismatch,
                     NotFound, Unavailable)
from .locking import RWLock
from .probes import ProbeReport
from .take import LOCALITY_TOKENS, TakeReport

__all__ = ["BaseModelMismatch", "Conflict", "EditEngine", "EditSpec", "EngineError", "GREEDY_BELOW", "InvalidEdit",
           "InvalidRequest", "LOCALITY_TOKENS", "LogSettingsMismatch", "NotFound", "ProbeReport", "RWLock",
           "TakeReport", "Unavailable"]
