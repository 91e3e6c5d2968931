"""`fedit export`: exact-aggregation round directories give the trained model with fedit's
loader and the export, not with plain PeftModel.from_pretrained (it ignores
base_residual.safetensors); the exported tokenizer's chat template renders the prompt the
run trained with."""

import json
from pathlib import Path

import pytest
import torch
from jinja2 import TemplateError
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from fedit.cli.main import app
from fedit.config import load_config
from fedit.data.records import Record
from fedit.data.templates import render_conversation
from fedit.data.tokenize import tokenize_prompt
from fedit.models.adapters import attach_lora, get_adapter_state, load_saved_adapter, save_adapter
from fedit.models.loading import load_model
from fedit.models.tiny import byte_tokenizer, make_tiny_model
from tests.conftest import tiny_run_overrides

runner = CliRunner()


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model.eval()(input_ids=torch.tensor([[5, 40, 41, 42, 2, 17, 99]])).logits


def test_exact_rounds_load_with_fedit_or_export_not_plain_peft(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    overrides = tiny_run_overrides(
        tiny_model_dir,
        tmp_path / "run",
        **{"strategy.lora_aggregation": "exact", "federation.rounds": 2, "lora.dropout": 0.0},
    )
    result = runner.invoke(app, ["train", "--quiet", *[a for o in overrides for a in ("--set", o)]])
    assert result.exit_code == 0, result.output
    round_dir = tmp_path / "run" / "round_0002"
    note = (round_dir / "LOADING.txt").read_text()
    assert "load_saved_adapter" in note and "fedit export" in note

    merged = tmp_path / "merged"
    result = runner.invoke(app, ["export", "--adapter", str(round_dir), "--out", str(merged)])
    assert result.exit_code == 0, result.output

    cfg = load_config(round_dir / "config.toml").model
    expected = logits(load_saved_adapter(load_model(cfg), round_dir))
    exported = logits(AutoModelForCausalLM.from_pretrained(merged))
    plain = logits(PeftModel.from_pretrained(load_model(cfg), str(round_dir)))
    assert (exported - expected).abs().max() < 1e-5
    assert (plain - expected).abs().max() > 1e-4


# SmolLM2's chat template: its own system prompt when a conversation has none
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def exported_tiny_run(tmp_path: Path, tokenizer, template: str, overrides: list[str]) -> Path:
    """`fedit export` of a tiny model with `tokenizer`, trained under `template`: its dir."""
    model_dir = make_tiny_model(tmp_path / "model", tokenizer=tokenizer)
    run = tiny_run_overrides(model_dir, tmp_path / "run", **{"data.template": template})
    cfg = load_config(None, [*run, *overrides])
    model = attach_lora(load_model(cfg.model), cfg.lora, seed=0)
    adapter = tmp_path / "run" / "round_0001"
    save_adapter(model, get_adapter_state(model), adapter)
    cfg.save(adapter / "config.toml")
    merged = tmp_path / "merged"
    result = runner.invoke(app, ["export", "--adapter", str(adapter), "--out", str(merged)])
    assert result.exit_code == 0, result.output
    return merged


@pytest.mark.parametrize(
    "template, system_prompt",
    [
        ("chat", ""),
        ("chat", 'Be brief, "exact" {{ and }} {% raw %}.'),
        ("chat", None),
        ("alpaca", None),
    ],
)
def test_the_exported_chat_template_gives_the_prompt_fedit_trains_with(
    tmp_path: Path, template: str, system_prompt: str | None
) -> None:
    """Plain transformers used the natural way (apply_chat_template on the export) gets,
    token for token, the prompt fedit trained and generates with."""
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = DEFAULT_SYSTEM_TEMPLATE
    extra = [] if system_prompt is None else [f"data.system_prompt={json.dumps(system_prompt)}"]
    merged = exported_tiny_run(tmp_path, tokenizer, template, extra)

    exported = AutoTokenizer.from_pretrained(merged)
    for question in ["Add 2 and 3.", "Name a colour.\n\nRed or blue?"]:
        fedit_prompt = tokenize_prompt(Record(question, ""), tokenizer, template, system_prompt)
        messages = [{"role": "user", "content": question}]
        natural = exported.apply_chat_template(messages, add_generation_prompt=True)
        assert natural["input_ids"] == fedit_prompt, exported.decode(natural["input_ids"])
    turns = [("user", "Hi"), ("assistant", "Hello"), ("user", "Add 2 and 3.")]
    conversation = [{"role": role, "content": text} for role, text in turns]
    if template == "alpaca":  # one user turn, as `fedit serve` takes it
        with pytest.raises(TemplateError, match="single user message"):
            exported.apply_chat_template(conversation, add_generation_prompt=True)
    else:
        served = render_conversation(conversation, template, tokenizer, system_prompt)
        natural = exported.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        assert natural == served


def test_the_export_stops_generating_where_the_run_s_template_ends_a_turn(tmp_path: Path) -> None:
    """A chat-trained model whose turns end with another token than eos (Qwen2.5 base:
    <|im_end|> against <|endoftext|>) stops there under plain transformers' generate too."""
    from transformers import GenerationConfig

    from fedit.data.templates import stop_token_ids
    from tests.conftest import chatml_base_tokenizer

    tokenizer = chatml_base_tokenizer()
    merged = exported_tiny_run(tmp_path, tokenizer, "chat", [])

    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn != tokenizer.eos_token_id
    assert stop_token_ids("chat", tokenizer)[0] == end_of_turn
    eos = GenerationConfig.from_pretrained(merged).eos_token_id
    assert end_of_turn in (eos if isinstance(eos, list) else [eos])
