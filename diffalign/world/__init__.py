"""The embedded shapes world: captioned procedural images, a verifiable reward, tiny models.

It lets every diffalign method run, be measured and be tested end to end offline on a CPU.
"""
