import json

from core.logging import MetricsLogger, find_secret, redact_secrets, secret_override, wandb_mode


def test_wandb_falls_back_to_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    mode, notice = wandb_mode("auto")
    assert mode == "offline" and "no credentials" in notice
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == ("disabled", None)
    assert wandb_mode("online") == ("online", None)


def test_secrets_are_redacted():
    cfg = {
        "logger": {"api_key": "abc", "project": "p"},
        "hub_token": "t",
        "n": {"password": "x", "tokens": 3, "WANDB_API_KEY": "k", "secret-token": "s"},
        "model": {"tokenizer": "gpt2", "num_key_value_heads": 4, "keyframes": "k"},
        "camel": {
            "hfToken": "t",
            "accessToken": "a",
            "apiKey": "k",
            "tokenizerName": "gpt2",
            "monkeyBars": "m",
        },
    }
    assert redact_secrets(cfg) == {"logger": {"api_key": "***", "project": "p"}, "hub_token": "***",
                                   "n": {"password": "***", "tokens": 3, "WANDB_API_KEY": "***", "secret-token": "***"},
                                   "model": {"tokenizer": "gpt2", "num_key_value_heads": 4, "keyframes": "k"},
                                   "camel": {"hfToken": "***", "accessToken": "***", "apiKey": "***",
                                             "tokenizerName": "gpt2", "monkeyBars": "m"}}  # fmt: skip
    # other words, compound words, and credentials inside a URL
    more = {"credential": "c", "auth": "a", "bearer": "b", "ssh_passphrase": "p", "hftoken": "t",
            "wandbapikey": "k", "dbcredentials": "c", "author": "me", "max_new_tokens": 8,
            "url": "https://user:p@ss@example.com/x", "mirror": "https://example.com/a@b"}  # fmt: skip
    assert redact_secrets(more) == {"credential": "***", "auth": "***", "bearer": "***",
                                    "ssh_passphrase": "***", "hftoken": "***", "wandbapikey": "***",
                                    "dbcredentials": "***",
                                    "author": "me", "max_new_tokens": 8, "url": "https://***@example.com/x",
                                    "mirror": "https://example.com/a@b"}  # fmt: skip
    assert find_secret({"a": [{"b": 1}, {"hub_token": "t"}]}) == "a.1.hub_token"
    assert find_secret({"comet": {"experiment_key": "e1"}, "model": {"num_key_value_heads": 4}}) is None


def test_metrics_jsonl_and_offline_wandb_run(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = MetricsLogger(tmp_path, backend="wandb", config={"a": 1, "wandb_key": "secret"}, project="test", entity=None,
                           group="g", name=None, mode="auto", job_type="sft", tags=[], total_steps=2)  # fmt: skip
    logger.log({"train/loss": 1.5}, step=1)
    logger.log_samples([{"prompt": "p", "response": "r"}], step=1)
    logger.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "train/loss": 1.5}]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "wandb wrote no offline run"
    saved = "".join(p.read_text(errors="ignore") for p in runs[0].rglob("config.yaml"))
    assert "secret" not in saved


def test_rewind_drops_later_rows_and_a_row_cut_short(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a": 3}\n')
    (tmp_path / "samples.jsonl").write_text('{"step": 1, "prompt": "p"}\n{"step": 2, "a"')  # a crash mid-row
    logger = MetricsLogger(tmp_path, backend="none", config={}, project="test", entity=None, group=None, name=None,
                           mode="auto", job_type="ppo", tags=[], total_steps=3)  # fmt: skip
    logger.rewind(2)
    logger.log({"a": 3.5}, step=3)
    logger.close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (tmp_path / "samples.jsonl").read_text() == '{"step": 1, "prompt": "p"}\n'
    # no checkpoint to resume from: the run starts over, and its step-0 rows are not there twice
    logger = MetricsLogger(tmp_path, backend="none", config={}, project="test", entity=None, group=None, name=None,
                           mode="auto", job_type="ppo", tags=[], total_steps=3)  # fmt: skip
    logger.log({"data/n": 1}, step=0)
    logger.rewind(0)
    logger.log({"data/n": 1}, step=0)
    logger.close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0] and (tmp_path / "samples.jsonl").read_text() == ""


def test_a_secret_override_on_the_command_line_is_found_by_its_key():
    assert (
        secret_override(["sft.deepspeed.extra.comet.api_key=s3cr3t", "x=1"])
        == "sft.deepspeed.extra.comet.api_key"
    )
    assert secret_override(["+logger.hub_token=t"]) == "logger.hub_token"
    assert secret_override(["--local_rank=0", "hydra.run.dir=d", "rollout.max_new_tokens=8",
                            "sft.deepspeed.extra.comet.experiment_key=e1", "-m", "model.tokenizer=gpt2"]) is None  # fmt: skip
