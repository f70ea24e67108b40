"""The shared run scaffold (tf_ssl/runner.py): warmup clamping, whole
executions, and one-line user errors."""


import pytest

from tf_ssl import runner


def test_warmup_longer_than_the_run_is_clamped_with_a_warning(caplog):
  # 10 warmup epochs of 100 steps in a 300-step run: pure warmup before.
  assert runner.warmup_steps(10, 100, 300) == 30
  assert "warming up for 30 steps" in caplog.text
  assert runner.warmup_steps(1, 100, 300) == 100
  assert runner.warmup_steps(0, 100, 300) == 0


def test_whole_executions_round_up():
  assert [runner.whole_executions(s, 26) for s in (1, 26, 27, 468 * 6.5)] == [26, 26, 52, 3042]


@pytest.mark.parametrize("error, user", [
    (runner.UserError("--x=1: bad"), True),
    (FileNotFoundError("/no/such/file not found"), False),
])
def test_user_errors_are_one_line_others_keep_their_traceback(error, user, capsys):
  def raise_it():
    raise error
  with pytest.raises(SystemExit if user else type(error)):
    with runner.user_errors("prog"):
      raise_it()
  if user:
    assert capsys.readouterr().err == f"prog: error: {error}\n"


def test_errors_while_preparing_are_the_users(capsys):
  with pytest.raises(SystemExit) as exit_info:
    with runner.user_errors("prog"):
      with runner.preparing():
        raise FileNotFoundError("--init=/x: no such checkpoint\nmore detail")
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == "prog: error: --init=/x: no such checkpoint\n"
  with pytest.raises(ValueError, match="library callers"):  # unchanged outside the CLI
    with runner.preparing():
      raise ValueError("library callers still get the exception")


def test_bfloat16_on_a_cpu_without_bfloat16_instructions_warns(tmp_path, caplog):
  avx2_only = tmp_path / "avx2"
  avx2_only.write_text("flags\t\t: fpu sse2 avx avx2 fma\n")
  native = tmp_path / "bf16"
  native.write_text("flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16\n")
  assert runner.cpu_has_native_bfloat16(str(avx2_only)) is False
  assert runner.cpu_has_native_bfloat16(str(native)) is True
  assert runner.cpu_has_native_bfloat16(str(tmp_path / "missing")) is None
  assert runner._warn_if_bfloat16_is_emulated(str(avx2_only))  # pylint: disable=protected-access
  assert "bfloat16 is emulated" in caplog.text
  assert not runner._warn_if_bfloat16_is_emulated(str(native))  # pylint: disable=protected-access
