"""The model card a run writes into final/README.md (the trainers' use of it: test_trainers.py)."""

from diffalign.train.config import AWMConfig
from diffalign.train.guard import GuardTrip
from diffalign.train.model_card import heldout_changes, model_card

ROWS = [
    {"step": 0, "samples_seen": 0, "heldout_reward_mean": 0.5, "heldout_tiny_clip_mean": 16.0},
    {"step": 1, "samples_seen": 32, "loss": 0.1},
    {"step": 2, "samples_seen": 64, "heldout_reward_mean": 0.6, "heldout_tiny_clip_mean": 15.9},
    {"step": 3, "samples_seen": 96},
    {"step": 4, "samples_seen": 128, "heldout_reward_mean": 0.7, "heldout_tiny_clip_mean": 14.0},
]


def test_held_out_changes_run_from_round_zero_to_the_kept_round():
    assert heldout_changes(ROWS, 4) == [
        ("heldout_reward_mean", 0.5, 0.7),
        ("heldout_tiny_clip_mean", 16.0, 14.0),
    ]
    assert heldout_changes(ROWS, 3)[1] == ("heldout_tiny_clip_mean", 16.0, 15.9)


def test_the_card_says_what_was_trained_how_and_which_weights_it_holds():
    config = AWMConfig(model="runs/base", reward="shapes", learning_rate=1e-3)
    card = model_card("awm", config, ROWS, trip=None)
    assert card.startswith("---\nlibrary_name: diffusers\nbase_model: runs/base\n")
    assert "on the reward `shapes`: 4 rounds, 128 sampled images" in card
    assert "LoRA rank 4, merged, learning rate 0.001" in card
    assert "| heldout_tiny_clip_mean | 16 | 14 |" in card and "round 4)" in card
    assert "StableDiffusionPipeline.from_pretrained" in card and "Stopped early" not in card
    assert "`kohya_lora.safetensors`, the same adapter for A1111" in card
    sd3 = model_card("awm", config, ROWS, trip=None, pipeline_class="StableDiffusion3Pipeline")
    assert "kohya" not in sd3  # an SD3 adapter is kept in diffusers' format only
    trip = GuardTrip("heldout_tiny_clip_mean", 16.0, 14.0, 0.125, 0.05, step=4, passed_step=2)
    card = model_card("awm", config, ROWS, trip=trip, flow=True)
    assert "Stopped early by the reward-hacking guard: heldout_tiny_clip_mean fell 12.50%" in card
    assert "| heldout_tiny_clip_mean | 16 | 15.9 |" in card and "this model (round 2)" in card
    assert "RolloutPipeline.from_pretrained" in card
