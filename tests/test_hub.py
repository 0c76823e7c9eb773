"""push_to_hub: access checked before any work, final/ and lora/ uploaded, failures explained."""

import pytest

from diffalign.cli import main
from diffalign.config import ConfigError
from diffalign.train.config import DDPOConfig
from diffalign.train.ddpo import DDPOTrainer
from diffalign.train.hub import HubUploadError, push_run

from .test_trainers import TINY


class FakeHub:
    """Stands in for huggingface_hub.HfApi, recording what would be sent."""

    def __init__(self, fail: bool = False):
        self.fail, self.calls = fail, []

    def install(self, monkeypatch) -> "FakeHub":
        import huggingface_hub

        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
        monkeypatch.setattr(huggingface_hub, "HfApi", lambda: self)
        return self

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, path_in_repo=None, commit_message=None):
        if self.fail:
            raise ConnectionError("no route to huggingface.co")
        files = sorted(p.name for p in folder_path.iterdir())
        self.calls.append(("upload_folder", repo_id, folder_path.name, path_in_repo, files))


def test_a_finished_run_uploads_its_pipeline_card_and_adapter(tmp_path, monkeypatch, capsys):
    hub = FakeHub().install(monkeypatch)
    out = tmp_path / "tiny-awm"
    args = ["train", "awm", "--recipe", "tiny-shapes", *TINY, "--set", "push_to_hub=true",
            "hub_private_repo=true", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    create, final, lora = hub.calls
    assert create == ("create_repo", "tiny-awm", True, True)  # the folder's name by default
    assert final[:4] == ("upload_folder", "tiny-awm", "final", None)
    assert {"README.md", "model_index.json", "unet", "training.json"} <= set(final[4])
    assert lora[2:4] == ("lora", "lora") and "pytorch_lora_weights.safetensors" in lora[4]
    assert "on the Hub: https://huggingface.co/tiny-awm" in capsys.readouterr().out
    card = (out / "final" / "README.md").read_text()
    assert 'from_pretrained("tiny-awm")' in card and "this repository's `lora/`" in card


def test_push_to_hub_is_refused_before_any_work_without_access(tmp_path, monkeypatch):
    import huggingface_hub

    config = DDPOConfig(push_to_hub=True, log_with="none")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set.*push_to_hub=false"):
        DDPOTrainer(config, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ConfigError, match="token with write access.*hf auth login"):
        DDPOTrainer(config, tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_failed_upload_says_the_run_is_saved_and_how_to_retry(tmp_path, monkeypatch):
    FakeHub(fail=True).install(monkeypatch)
    (tmp_path / "final").mkdir()
    with pytest.raises(HubUploadError, match=r"saved in .*no route.*hf upload me/run .*final"):
        push_run(tmp_path, "me/run")
    assert (tmp_path / "final").is_dir()
