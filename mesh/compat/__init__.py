"""Other systems' configuration, turned into ours.

``modelmesh_config``: modelmesh-serving's ``model-serving-config`` ConfigMap, key by key, into a
``mesh.toml`` fragment and notes (``mesh config from-modelmesh``). Pure: callers pass the bytes in.
"""
