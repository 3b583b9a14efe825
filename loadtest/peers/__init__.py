"""Peers measured side by side: Ray Serve multiplexing and MLServer, each in its own virtualenv.

``setup`` builds the venvs, ``ray_app`` and ``mlserver_app`` start and stop each peer as a
subprocess tree, ``drive`` sends closed-loop traffic and samples the tree's RSS, ``smoke`` ties
them together. The peers never import our code and we never import theirs: they talk over
127.0.0.1, so their pins (MLServer needs protobuf<7) cannot clash with ours.
"""
