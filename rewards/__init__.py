"""diffalign.rewards: reward adapters behind one contract, and their registry.

A reward is an ``nn.Module`` with ``forward(images, prompts) -> Tensor[B]`` over images in
[0, 1]; see DESIGN.md section 2 of the project for the contract.
"""
