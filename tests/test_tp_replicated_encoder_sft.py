"""SFT with the encoder replicated over TP (issue 22) on the tiny Voxtral (fp32, CPU, gloo, slow): TP=2 with
`model.encoder_parallel=replicate` trains like TP=2 with the encoder split, saves a torch_dist checkpoint, and
that checkpoint resumes at TP=1 onto the split run's next loss."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_sft_parallel import RESHARD_TOL, env, spawn  # noqa: F401  (env: the module's SFT fixture)

TOL = 1e-5  # relative, per step: the same TP=2 arithmetic, the encoder's whole tensors instead of head shards


@pytest.mark.slow
def test_replicated_encoder_trains_saves_and_resumes_like_split(env: dict[str, Path]) -> None:  # noqa: F811
    tp2 = {"parallel.tensor_model_parallel_size": 2, "training.train_iters": 4}
    split = spawn(env, 2, "enc-split", **tp2)[0]["losses"]
    replicated = spawn(
        env, 2, "enc-replicate", **tp2, **{"model.encoder_parallel": "replicate"}, **{"training.exit_after_iters": 3}
    )[0]["losses"]
    assert sorted(split) == [1, 2, 3, 4] and sorted(replicated) == [1, 2, 3]
    for step, loss in replicated.items():
        assert abs(loss - split[step]) <= TOL * abs(split[step]), (step, loss, split[step])
    resumed = spawn(env, 1, "enc-replicate", **{"training.train_iters": 4})[0]
    assert resumed["resumed_from"] == 3 and sorted(resumed["losses"]) == [4]
    assert abs(resumed["losses"][4] - split[4]) <= RESHARD_TOL * abs(split[4]), (resumed["losses"][4], split[4])
