"""The new checkpoint formats wherever a model directory is accepted: ``model.path``
(EasyLM, with the architecture from ``model.llama_config``), a stage's ``reference``
(MaxText), a stage export with ``train.export_msgpack``, and ``python -m sacpo_jax.merge``
(Flax msgpack + MaxText inputs).

Truth: our safetensors import of the torch model every format was written from, and the
merge's closed form theta = (1 - q) A + q B.
"""

import os
import shutil

import numpy as np
import pytest
import transformers
import yaml
from fixtures_easylm import write_streaming
from fixtures_maxtext import write_maxtext
from fixtures_models import randomize
from test_hf_io import assert_bit_exact, params_of

from sacpo_jax import merge, train
from sacpo_jax.models import hf

PAIR_DATA = {
    "source": {"type": "bundled", "name": "preference"},
    "adapter": "pku_helpful",
    "max_length": 48,
    "max_prompt_length": 24,
    "limit": 32,
}
SFT_DATA = {
    "source": {"type": "bundled", "name": "sft"},
    "adapter": "sft",
    "template": "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:",
    "max_length": 48,
    "max_prompt_length": 24,
    "limit": 32,
}
TRAIN = {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "save_every": 2}


@pytest.mark.slow
def test_easylm_start_maxtext_reference_msgpack_export_and_merge(tmp_path):
    torch_dir = str(tmp_path / "torch")
    config = transformers.LlamaConfig(
        vocab_size=196, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    randomize(transformers.LlamaForCausalLM(config), seed=3).save_pretrained(torch_dir)
    easylm_dir = tmp_path / "easylm"
    easylm_dir.mkdir()
    write_streaming(torch_dir, str(easylm_dir / "streaming_params"))
    maxtext_dir = str(tmp_path / "maxtext")
    write_maxtext(torch_dir, maxtext_dir)
    shutil.copy(os.path.join(torch_dir, "config.json"), maxtext_dir)

    run = {
        "name": "formats",
        "run_dir": str(tmp_path / "run"),
        "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
        "model": {
            "path": str(easylm_dir),
            "format": "easylm",
            "llama_config": os.path.join(torch_dir, "config.json"),
        },
        "tokenizer": {"path": "bundled:oracle"},
        "tensorboard": False,
        "progress_bar": False,
        "stages": [
            {
                "name": "sft",
                "kind": "sft",
                "data": SFT_DATA,
                "train": {**TRAIN, "export_msgpack": True},
            },
            {
                "name": "dpo",
                "kind": "dpo",
                "data": PAIR_DATA,
                "reference": maxtext_dir,
                "train": TRAIN,
            },
        ],
    }
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(run))
    assert train.main(["--config", str(config_path)]) == 0

    export = tmp_path / "run" / "stages" / "sft" / "model"
    assert (export / "flax_model.msgpack").is_file()
    from_safetensors = hf.load_checkpoint(str(export))
    assert_bit_exact(hf.load_checkpoint(str(export), format="flax_msgpack"), from_safetensors)
    start = params_of(hf.load_checkpoint(torch_dir))
    assert not np.array_equal(params_of(from_safetensors)["layers/q"], start["layers/q"])

    msgpack_only = tmp_path / "sft_msgpack"
    msgpack_only.mkdir()
    for name in ("flax_model.msgpack", "config.json"):
        shutil.copy(export / name, msgpack_only)
    merged_dir = str(tmp_path / "merged")
    assert merge.main(["--models", str(msgpack_only), maxtext_dir, "--q", "0.25",
                       "--output", merged_dir]) == 0  # fmt: skip
    merged = params_of(hf.load_checkpoint(merged_dir))
    sft = params_of(from_safetensors)
    for name, value in merged.items():
        np.testing.assert_allclose(value, 0.75 * sft[name] + 0.25 * start[name], atol=1e-6)
