"""Fault injection for the resilience tests (and for rehearsing preemption on a real cluster).

VANCLS_FAULT holds one fault: `kill:update=N` (SIGKILL this process right after optimizer update N),
`kill:save=N` (SIGKILL during the N-th checkpoint write, after the temporary file is written and before it
replaces the real one), or `nan:update=N` (make the loss of update N non-finite). Optional `:rank=R` limits
it to one rank. With VANCLS_FAULT_ONCE=PATH the fault fires only if PATH does not exist, and creates it
first (so a process restarted by torchrun does not fail again). Unset: every check is a dict lookup.
"""
import os
import signal

_saves = 0


def _parse():
    spec = os.environ.get('VANCLS_FAULT', '')
    if not spec:
        return None
    kind, _, rest = spec.partition(':')
    fields = dict(item.split('=', 1) for item in rest.split(':') if '=' in item)
    if kind not in ('kill', 'nan') or not ({'update', 'save'} & set(fields)):
        raise ValueError(f'VANCLS_FAULT={spec!r}: expected kill:update=N, kill:save=N or nan:update=N [:rank=R]')
    return kind, fields


def _fire(fields) -> bool:
    if 'rank' in fields and int(os.environ.get('RANK', 0)) != int(fields['rank']):
        return False
    marker = os.environ.get('VANCLS_FAULT_ONCE')
    if marker:
        if os.path.exists(marker):
            return False
        open(marker, 'w').close()
    return True


def after_update(num_updates: int):
    fault = _parse()
    if fault and fault[0] == 'kill' and int(fault[1].get('update', -1)) == num_updates and _fire(fault[1]):
        os.kill(os.getpid(), signal.SIGKILL)


def nan_loss(num_updates: int) -> bool:
    """True when the loss of the coming update `num_updates + 1` should be made non-finite."""
    fault = _parse()
    return bool(fault and fault[0] == 'nan' and int(fault[1].get('update', -1)) == num_updates + 1
                and _fire(fault[1]))


def during_save():
    global _saves
    _saves += 1
    fault = _parse()
    if fault and fault[0] == 'kill' and int(fault[1].get('save', -1)) == _saves and _fire(fault[1]):
        os.kill(os.getpid(), signal.SIGKILL)
