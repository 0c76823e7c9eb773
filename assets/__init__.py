"""Package data of diffalign: the embedded tiny models, prompt sets and recipes.

Installed as ``diffalign.assets``; find files with
``importlib.resources.files("diffalign.assets") / "NAME"``.
"""
