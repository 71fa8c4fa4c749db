"""Fault injection for the resilience tests (and for rehearsing preemption on a real cluster).

VANCLS_FAULT holds one fault: `kill:update=N` (SIGKILL this process right after optimizer update N),
`kill:save=N` (SIGKILL during the N-th checkpoint write, after the temporary file is written and before it
replaces the real one), `kill:eval=N` (SIGKILL before the N-th evaluation batch this process computes, counted
over the evaluations of the run), `signal:update=N` / `signal:save=N` / `signal:eval=N` (the same points, but a
catchable signal, `:sig=NAME` with NAME one of TERM (default), INT, USR1, ...: what a scheduler sends, at an
exact position), or `nan:update=N` (make the loss of update N non-finite). Optional `:rank=R` limits it to one rank. With
VANCLS_FAULT_ONCE=PATH the fault fires only if PATH does not exist, and creates it first (so a process restarted
by torchrun does not fail again). Unset: every check is a dict lookup.
"""
import os
import signal

_saves = 0
_eval_batches = 0


def _parse():
    spec = os.environ.get('VANCLS_FAULT', '')
    if not spec:
        return None
    kind, _, rest = spec.partition(':')
    fields = dict(item.split('=', 1) for item in rest.split(':') if '=' in item)
    if kind not in ('kill', 'signal', 'nan') or not ({'update', 'save', 'eval'} & set(fields)):
        raise ValueError(f'VANCLS_FAULT={spec!r}: expected kill:update=N, kill:save=N, kill:eval=N, '
                         f'signal:update=N, signal:save=N, signal:eval=N [:sig=TERM|INT|USR1|...] or nan:update=N '
                         f'[:rank=R]')
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


def _send(where: str, count: int):
    """SIGKILL (kill:) or the named catchable signal (signal:) to this process when `where`=N matches."""
    fault = _parse()
    if not fault or fault[0] not in ('kill', 'signal') or int(fault[1].get(where, -1)) != count:
        return
    if not _fire(fault[1]):
        return
    if fault[0] == 'kill':
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        name = fault[1].get('sig', 'TERM').upper()
        os.kill(os.getpid(), getattr(signal, name if name.startswith('SIG') else f'SIG{name}'))


def after_update(num_updates: int):
    _send('update', num_updates)


def nan_loss(num_updates: int) -> bool:
    """True when the loss of the coming update `num_updates + 1` should be made non-finite."""
    fault = _parse()
    return bool(fault and fault[0] == 'nan' and int(fault[1].get('update', -1)) == num_updates + 1
                and _fire(fault[1]))


def during_save():
    global _saves
    _saves += 1
    _send('save', _saves)


def during_eval():
    """Before each evaluation batch (the N-th of the process: a signal while the model evaluates)."""
    global _eval_batches
    _eval_batches += 1
    _send('eval', _eval_batches)
