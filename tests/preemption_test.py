"""Preemption: SIGKILL and SIGTERM at random moments leave the final state bitwise unchanged.

The short form of tests/fault_injection.py; a file of its own so that it runs beside the rest
of the suite (it spends most of its time starting processes).
"""

import fault_injection


def test_random_sigkills_and_sigterms_leave_the_final_state_bitwise_unchanged(tmp_path):
  rows, same = fault_injection.inject_faults(str(tmp_path), kills=2, steps=8, seed=0)
  print("\n".join(str(row) for row in rows))
  assert same, rows
  moments = [row[2] for row in rows[:-1]]
  assert "during a checkpoint write" in moments
  for attempt, sent, moment, code, _ in rows[:-1]:
    if moment != "finished first":
      # SIGTERM: checkpoint, then a clean exit; SIGKILL: killed.
      assert code == (0 if sent == "SIGTERM" else -9), (attempt, sent, code)
