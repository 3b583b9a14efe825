"""One typed settings object, built once at start-up and passed in.

Sources, later ones winning: the defaults below; a TOML config file (``--config FILE`` or
``MESH_CONFIG``) with one table per group (``[registry]``, ``[router]``, ``[runtime]``, ``[controller]``,
``[tls]``, ``[auth]``, ``[log]``, ``[storage]``);
environment variables ``MESH_<GROUP>_<FIELD>`` (``MESH_RUNTIME_CAPACITY_BYTES=2GiB``); explicit
overrides from the command line. Unknown keys are errors, not silently ignored: a typo in a
capacity setting should stop the process rather than run it with the default.

Every field documents its unit, and why its default is what it is; ``mesh settings`` prints them.
Byte sizes accept suffixes (``512MiB``, ``2GiB``, ``1.5GB``); durations are in seconds.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.errors import InvalidArgument

_MIB = 1024 * 1024


def _f(default: Any, doc: str, unit: str = "") -> Any:
    return field(default=default, metadata={"doc": doc, "unit": unit})


@dataclass(frozen=True)
class RegistrySettings:
    url: str = _f("etcd://127.0.0.1:2379",
                  "Registry address: etcd://host:port[,host:port...][/prefix], or memory:// for "
                  "components that share one process. `mesh up` sets it to its private etcd.")
    timeout_s: float = _f(2.0, "Deadline of one registry call; past it, management calls fail fast "
                          "with UNAVAILABLE instead of hanging while etcd is down.", "s")
    lease_ttl_s: int = _f(10, "TTL of each instance's lease. A dead instance's placements vanish "
                          "this long after it dies (ModelMesh: 20 s, plus a reaper pass of minutes).", "s")
    failure_ttl_s: int = _f(300, "How long a load-failure record lives; while it does, routers do not "
                            "retry the load on that instance (ModelMesh keeps them 15 min).", "s")
    crash_quarantine_s: int = _f(60, "A runtime that dies while loading a model quarantines that model: no "
                                 "runtime loads it for this long. A runtime that restarts and finds the "
                                 "load crashed it (a fatal signal in the loader) makes the quarantine last "
                                 "until the model is registered again (docs/security.md).", "s")
    # etcd security (docs/security.md). TLS is on when ca_file is set; the credentials are etcd's own
    # users (`etcdctl user add`, `auth enable`). None of these ever appears in a log line or the URL.
    ca_file: str = _f("", "PEM CA bundle etcd's server certificate is verified with; setting it turns TLS "
                      "on for every etcd endpoint (empty: plaintext, etcd's default).")
    cert_file: str = _f("", "PEM client certificate for etcd started with --client-cert-auth (needs ca_file "
                        "and key_file).")
    key_file: str = _f("", "PEM private key of cert_file.")
    username: str = _f("", "etcd user (etcd auth enabled); empty: no authentication.")
    password: str = field(default="", repr=False, metadata={
        "doc": "Password of username. Prefer the environment (MESH_REGISTRY_PASSWORD) or password_file "
               "to a config file; it is never logged.", "unit": ""})
    password_file: str = _f("", "File holding the password of username (a mounted Secret); trailing "
                            "newline ignored. Used when password is empty.")


@dataclass(frozen=True)
class RouterSettings:
    host: str = _f("127.0.0.1", "Address the router binds (0.0.0.0 in a pod).")
    port: int = _f(8033, "gRPC port: V2 data plane and the mmesh.ModelMesh management API "
                   "(ModelMesh's port).")
    rest_port: int = _f(8008, "HTTP port of the REST front end on the router's host: Open Inference "
                        "Protocol REST (with Triton's binary tensors) and KServe V1 (modelmesh-serving's "
                        "REST port). Same tokens, TLS and metrics as gRPC; 0 picks a free port (logged), "
                        "-1 turns REST off.")
    reflection: bool = _f(True, "gRPC server reflection on the router's port, so that grpcurl and similar "
                          "tools list and call its services without the .proto files. It tells only what "
                          "the public V2 and ModelMesh protos say, and needs no token (calls still do).")
    metrics_host: str = _f("127.0.0.1", "Address the Prometheus metrics endpoint binds (0.0.0.0 in a pod, "
                           "for the scraper).")
    metrics_port: int = _f(2112, "HTTP port serving Prometheus metrics at /metrics (ModelMesh's port); 0 "
                           "picks a free port (logged), -1 turns metrics off.")
    per_model_metrics: bool = _f(False, "Label request metrics with the model ID (and vModel ID), and count "
                                 "requests per split vModel target (mesh_vmodel_requests_total): one "
                                 "series per model, so off by default, as in ModelMesh (docs/metrics.md).")
    max_attempts: int = _f(4, "Forwarding attempts per request; each retry excludes the instance that "
                           "answered 'not here' or was gone. Inference is treated as idempotent.")
    default_timeout_s: float = _f(60.0, "Deadline of loads the router asks for itself (ensureLoaded, "
                                  "vModel targets). Inference carries the client's own deadline "
                                  "to the runtime, or none if the client set none.", "s")
    streams_per_runtime: int = _f(2, "Long-lived streams to each runtime carrying forwarded inference "
                                  "(many requests per stream: half the runtime's CPU per request "
                                  "of one unary call each); 0 forwards each request as its own "
                                  "unary call.")
    load_factor: float = _f(1.25, "Bounded-load factor for choosing a model's home: an instance busier "
                            "than this times the mean is skipped (1.25 keeps homes stable while "
                            "capping a hot spot at +25 %).")
    scale_rps_threshold: float = _f(2000 / 60, "Requests per second per copy above which a hot model gets "
                                    "another copy (ModelMesh's 2000 per minute). Measured per router: "
                                    "with several routers each applies it to its share.", "req/s")
    scale_queue_threshold: float = _f(4.0, "Requests in flight per copy above which a model gets another "
                                      "copy, whatever its rate (slow models queue before their rate "
                                      "looks high).")
    scale_max_copies: int = _f(8, "Most copies of one model (a registration's maxCopies lowers it).")
    scale_hold_s: float = _f(120.0, "How long an added copy is kept ahead of the runtime's eviction "
                             "order, and how long a model must stay cool before an extra copy is "
                             "released to the cache policy.", "s")
    min_copies_check_s: float = _f(5.0, "How often the router reads the registrations with minCopies > 0 "
                                   "and loads the copies they lack, traffic or not.", "s")
    spec_cache_entries: int = _f(10_000, "Registrations of not-loaded models cached in the router; "
                                 "bounds router memory however many models are registered.")
    max_message_bytes: int = _f(16 * _MIB, "Largest gRPC message accepted or forwarded (ModelMesh's "
                                "default, 16 MiB).", "bytes")
    max_pending_requests: int = _f(4096, "Calls that have arrived but that the server has not yet started "
                                   "(router and runtime ports). Past it gRPC sheds new calls at random "
                                   "with CANCELLED, and all of them past twice it, which bounds memory "
                                   "under a flood. gRPC's own default (1,000) sheds a burst of 2,000 "
                                   "concurrent calls on one connection; 4,096 takes such bursts while "
                                   "holding at most a flow-control window per call.")
    max_inflight_bytes: int = _f(1024 * _MIB, "Request bytes in flight in one process (router, and runtime "
                                 "inference): a call that would pass it is answered RESOURCE_EXHAUSTED at "
                                 "once (mesh.transport.inflight).", "bytes")
    max_inflight_requests: int = _f(20_000, "Calls in flight in one process (router, and runtime inference); "
                                    "past it, RESOURCE_EXHAUSTED.")
    max_connection_inflight_bytes: int = _f(256 * _MIB, "Request bytes in flight on one client connection to "
                                            "a router; past it, RESOURCE_EXHAUSTED (0: no bound).", "bytes")
    max_streams_per_connection: int = _f(0, "Calls open at once on one connection (HTTP/2 "
                                         "MAX_CONCURRENT_STREAMS, router and runtime ports); 0: no limit "
                                         "(gRPC's default). Bounds the messages gRPC reads at once for one "
                                         "connection, before any handler can refuse them; gRPC clients queue "
                                         "the calls past it, but a burst on a new connection can have some "
                                         "refused (UNAVAILABLE, retryable).")
    unreachable_probe_s: float = _f(0.5, "How often the router probes an instance it marked unreachable "
                                    "(no answer at the connection level) to take it back; until then no "
                                    "request goes there first. Half a second: a killed runtime costs each "
                                    "router at most a couple of retried requests per probe, while one that "
                                    "blipped is back within a second.", "s")
    # Runtime replicas that follow demand (mesh.router.autoscale, placement.autoscale): the router
    # computes each runtime group's desired replicas and exports it for an HPA or KEDA (deploy/autoscaling).
    autoscale_interval_s: float = _f(10.0, "How often the router computes the replicas each runtime group "
                                     "needs (the mesh_runtime_replicas_desired gauge); 0 turns it off. Ten "
                                     "seconds: finer than an HPA's 15 s sync, one pass over the loaded "
                                     "copies each time.", "s")
    autoscale_window_s: float = _f(600.0, "A model counts in a group's working set when used within this "
                                   "long (its measured size then needs room in the group's replicas).", "s")
    autoscale_target_fill: float = _f(0.8, "Fraction of a group's model capacity its working set may fill; "
                                      "the rest is room for the models that come and go.")
    autoscale_target_rps: float = _f(500.0, "Requests per second one runtime replica serves comfortably (a "
                                     "small sklearn model saturates a 2-core runtime near 1,500 req/s); set "
                                     "it from your models' own throughput.", "req/s")
    autoscale_hold_s: float = _f(300.0, "How long a group's need must stay lower before it loses one "
                                 "replica, and between two such steps (scale-up is immediate).", "s")
    autoscale_min_replicas: int = _f(1, "Fewest replicas of a runtime group with registered models (at "
                                     "least 1 whatever this says; a group with none goes to 0).")
    autoscale_max_replicas: int = _f(10, "Most replicas the signal asks for, per runtime group.")
    autoscale_groups: tuple[str, ...] = _f((), "Bounds per runtime group, 'name=min:max' each (the name "
                                           "after rt: in the runtime's labels; '=min:max' for runtimes "
                                           "without one), overriding autoscale_min/max_replicas.")
    autoscale_scale_to_zero: bool = _f(True, "A runtime group with no registered model asks for 0 replicas "
                                       "(modelmesh-serving's ScaleToZero); off: its minimum.")
    # --- inference graph bounds (mesh.graphs; README "Inference graphs", docs/security.md) ---------
    graph_default_timeout_s: float = _f(60.0, "Deadline of an inference graph request whose client set none "
                                        "(a graph makes up to 256 model calls for one request: none may run "
                                        "unbounded); 0: no deadline. A client's own deadline always applies.",
                                        "s")
    max_graph_request_bytes: int = _f(256 * _MIB, "Bytes the steps of one graph request may make: every step's "
                                      "request, every answer and every merged Ensemble answer, counted as "
                                      "made; past it the request fails with RESOURCE_EXHAUSTED. 256 MiB is "
                                      "a 16 MiB request through 8 steps with answers of its size; 0: no bound.",
                                      "bytes")
    max_graphs: int = _f(1000, "Inference graphs the mesh may hold (setGraph of a new one past it: "
                         "RESOURCE_EXHAUSTED). Every router holds every graph parsed, at most ~0.3 MiB each (64 KiB "
                         "of JSON, 2048 condition components); 0: no bound.", "graphs")
    # --- end of inference graph bounds ------------------------------------------------------------
    # Payload logging (mesh.router.payloads): inference records as KServe logger CloudEvents.
    payload_processors: tuple[str, ...] = _f((), "Where inference records go, ModelMesh's MM_PAYLOAD_PROCESSORS "
                                             "URIs (comma- or space-separated): http(s)://host:port/path posts "
                                             "CloudEvents there, logger:// writes them to the log; a query names "
                                             "the one model or vModel ID logged (http://sink:8080/v2?my-model), "
                                             "a fragment the method (#ModelInfer, the only one logged). Empty: off.")
    payload_mode: str = _f("all", "Records per inference: request, response or all (KServe's logger mode).")
    payload_sample: float = _f(1.0, "Fraction of inference requests logged, drawn per request (a request's "
                               "request and response records go together).")
    payload_max_body_bytes: int = _f(256 * 1024, "Largest body a record carries; a larger one is sent without "
                                     "its body, its bodyomitted attribute (ce-bodyomitted) naming its size.",
                                     "bytes")
    payload_queue_records: int = _f(1000, "Records waiting per sink; past it (or past payload_queue_bytes) a "
                                    "record is dropped and counted, never waited for.")
    payload_queue_bytes: int = _f(64 * _MIB, "Body bytes waiting per sink; past it, dropped and counted.",
                                  "bytes")
    payload_content_mode: str = _f("binary", "How records travel to an HTTP sink: binary, one POST per record, "
                                   "attributes as ce-* headers, the protobuf message as the body (what KServe's "
                                   "logger and ModelMesh send: any sink made for them takes it); batched, one "
                                   "POST per batch, a JSON array of CloudEvents (application/cloudevents-"
                                   "batch+json, bodies base64 in data_base64), far cheaper per record but the "
                                   "sink must take that content type.")
    payload_batch_records: int = _f(256, "Batched mode: most records per POST.")
    payload_batch_bytes: int = _f(512 * 1024, "Batched mode: most body bytes per POST, each record counting 512 "
                                  "more for its attributes (the POST is at most about 4/3 of it: base64); a "
                                  "larger record goes alone. The default keeps a POST under 1 MiB (aiohttp's "
                                  "default body limit, for one).", "bytes")
    payload_linger_s: float = _f(0.05, "Batched mode: how long a sender waits for a batch to fill before it "
                                 "posts what is queued (0: post at once). Delays records, never inference.", "s")
    payload_inflight: int = _f(8, "Posts in flight per HTTP sink.")
    payload_timeout_s: float = _f(2.0, "Deadline of one post to a sink.", "s")
    payload_retries: int = _f(2, "Further attempts of a post that failed for a reason that may pass "
                              "(connection, timeout, 5xx, 429), after 0.1 s, then 0.2 s...")
    payload_flush_s: float = _f(2.0, "At shutdown, how long waiting records may take to go out; what is "
                                "left then is dropped and counted.", "s")
    payload_namespace: str = _f("", "The records' namespace attribute (ce-namespace; KServe's InferenceService "
                                "namespace; the controller's namespace in Kubernetes).")
    # --- route stream for smart clients (mesh.router.routes, mesh.client; docs/client.md) -------------
    routes_direct: bool = _f(True, "Offer direct routing on the route stream (mmesh.ModelMeshRoutes): smart "
                             "clients then send inference for loaded models straight to a runtime's direct "
                             "port (runtime.direct_port; runtimes without one get no direct traffic). Never "
                             "when this router serves TLS but dials runtimes in plaintext (no "
                             "tls.runtime_ca_file): clients would go to runtimes unencrypted.")
    routes_max_streams: int = _f(64, "Route streams one router serves at once; the next answers "
                                 "RESOURCE_EXHAUSTED.", "streams")
    routes_max_streams_per_peer: int = _f(8, "Route streams one client address may hold open at once (clients "
                                          "behind one NAT or proxy share it); the next answers "
                                          "RESOURCE_EXHAUSTED.", "streams")
    routes_queue: int = _f(64, "Updates waiting per route stream; a stream that falls further behind drops "
                           "them and gets a fresh snapshot instead (memory per stream stays bounded).",
                           "messages")
    routes_write_timeout_s: float = _f(10.0, "How long a route stream may wait for its client to acknowledge "
                                       "an update (the router sends at most a few unacknowledged) or to send "
                                       "its first request; past it the stream is cut off (RESOURCE_EXHAUSTED).",
                                       "s")
    routes_heartbeat_s: float = _f(1.0, "A route stream gets a message at least this often; clients treat "
                                   "their routes as stale after a few silent heartbeats.", "s")
    routes_interval_s: float = _f(0.05, "How often the route table is compared with the router's view (only "
                                  "when the view changed and a stream is open): the delay of an update.", "s")
    # --- end of route stream --------------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeSettings:
    host: str = _f("127.0.0.1", "Address the runtime binds (0.0.0.0 in a pod).")
    port: int = _f(8085, "gRPC port: V2 data plane and the mmesh.ModelRuntime SPI; 0 picks a free port.")
    metrics_host: str = _f("127.0.0.1", "Address the Prometheus metrics endpoint binds (0.0.0.0 in a pod, "
                           "for the scraper).")
    metrics_port: int = _f(2112, "HTTP port serving Prometheus metrics at /metrics (ModelMesh's port); 0 "
                           "picks a free port (logged), -1 turns metrics off.")
    health_port: int = _f(0, "Plaintext port serving grpc.health.v1 only, for probes that cannot speak "
                          "TLS (Kubernetes' gRPC probe) when the gRPC port requires client certificates; "
                          "0: off (health is always on the gRPC port too).")
    # --- direct port for smart clients (docs/client.md) ------------------------------------------
    direct_port: int = _f(-1, "Client-facing gRPC port for smart clients' direct inference (mesh.client): "
                          "only the V2 ModelInfer, ModelMetadata, ModelReady, ServerLive and ServerReady, with "
                          "the router's token rules (auth.data_plane), this process's TLS certificate but no "
                          "client certificate required, and never a load (a miss answers \"not here\"). "
                          "Published in the instance record; routers offer direct routing only to runtimes "
                          "that have one. -1: off (no direct routing to this runtime); 0 picks a free port.")
    # --- end direct port ---------------------------------------------------------------------------
    per_model_metrics: bool = _f(False, "Label inference, cache and load metrics with the model ID: one "
                                 "series per model, so off by default, as in ModelMesh (docs/metrics.md).")
    advertise_host: str = _f("", "Host published in the instance record for routers to dial; empty "
                             "means the bind host (set it to the pod IP in Kubernetes).")
    instance_id: str = _f("", "Stable instance ID; empty means <hostname>-<pid>-<random>.")
    capacity_bytes: int = _f(0, "RAM budget for loaded models; 0 derives it from capacity_fraction.",
                             "bytes")
    passthrough_bytes: int = _f(0, "Part of the RAM capacity held back for models the admission filter "
                                "refuses (the pass-through room): such a model is loaded there instead of "
                                "evicting an admitted one, and serves until a later refused model needs "
                                "the room. Admitted models get the rest. 0: off (a refused model enters "
                                "the main room as the first to go). It helps where loads have time to "
                                "spare, not where the load slots are saturated: try it on a trace with "
                                "`mesh sim run --passthrough` (BENCHMARKS.md section 25).", "bytes")
    capacity_fraction: float = _f(0.5, "Share of the memory limit (cgroup limit, else total RAM) given to "
                                  "models when capacity_bytes is 0; the rest is the runtime's own "
                                  "working memory and inference buffers.")
    gpu_capacity_fraction: float = _f(0.9, "Upper bound of each GPU's model budget as a share of its "
                                      "total memory (NVML), when gpu_capacity_bytes is 0.")
    gpu_capacity_bytes: int = _f(0, "Upper bound of each GPU's model budget; 0 uses gpu_capacity_fraction. "
                                 "The budget is also never more than the device's total minus "
                                 "gpu_reserve_bytes minus what is held outside this runtime's models "
                                 "(other processes, the CUDA context, activations), read from NVML "
                                 "every gpu_refresh_s.", "bytes")
    gpu_reserve_bytes: int = _f(1024 * _MIB, "GPU memory kept free of models on each device, for the "
                                "activations and workspaces of predictions in flight. 1 GiB holds a "
                                "batch of a mid-sized network's activations; raise it for large batches.",
                                "bytes")
    gpu_inference_threads: int = _f(1, "Threads running the predictions of each GPU's copies. cuBLAS and "
                                    "cuDNN keep a handle and workspace per thread (onnxruntime per session "
                                    "and thread: tens of MiB each on recent GPUs), so with one thread a "
                                    "copy's memory is what its load and warm-up measured; every further "
                                    "thread adds that much per copy, outside its measured size (the GPU "
                                    "budget then shrinks to make up for it). One GPU runs its kernels one "
                                    "after another anyway; raise it when host-side work (decoding, copies) "
                                    "limits a GPU's throughput.")
    gpu_refresh_s: float = _f(2.0, "How often each GPU's budget is recomputed from NVML. When another "
                              "process takes memory the budget shrinks and copies on that GPU (only) "
                              "are evicted to fit.", "s")
    max_concurrent_loads: int = _f(2, "Loads running at once; more wait in line. Two overlap one slow "
                                   "read with one deserialisation on a 2-core pod.")
    load_timeout_s: float = _f(90.0, "A load taking longer fails with DEADLINE_EXCEEDED and its "
                               "reservation is released (ModelMesh's default, 90 s).", "s")
    model_roots: tuple[str, ...] = _f((), "Directories model files may be read from (comma-separated in "
                                      "the environment). A registration's path must lie under one (a "
                                      "relative one is taken under the first): routers check it at "
                                      "registration, runtimes again at load on the real path (no '..', "
                                      "no symbolic link out, regular files only). Empty: not confined "
                                      "(the embedded mesh up); deploy/ sets /models.")
    allow_code_formats: bool = _f(True, "Load formats that run code when loaded: pickled scikit-learn "
                                  "models (.joblib, .pkl) and TorchScript. false refuses them: "
                                  "scikit-learn models must then be skops files (.skops).")
    skops_trusted_types: tuple[str, ...] = _f((), "Types a .skops file may hold beyond those skops trusts by "
                                              "default (e.g. sklearn.tree._tree.Tree for tree models: skops "
                                              "does not trust their unchecked node indices).")
    max_stuck_loads: int = _f(4, "Loads abandoned at load_timeout_s whose threads have not returned (a "
                              "stuck mount, a hung library) after which the runtime takes no more loads "
                              "and reports not ready: it serves what it holds, and routers load "
                              "elsewhere. Each stuck load holds a thread and its reserved memory.")
    state_dir: str = _f("", "Where the runtime writes down the loads in progress and any fatal crash, so "
                        "that after a restart it can say which model killed it, in a folder per instance ID "
                        "(runtimes may share it; empty: <temp dir>/mesh-runtime). It must survive a "
                        "restart of the process, as an emptyDir survives a container restart.")
    # --- issue 18: libraries imported when first used (mesh.runtime.libraries) ---
    preload_types: tuple[str, ...] = _f((), "Model types whose libraries are imported at start-up, before "
                                        "the instance reports ready (comma-separated in the environment), "
                                        "so that their first request waits for no import; a failed import "
                                        "disables its type. Empty: none; each other type's library is "
                                        "imported at the first load of a model of that type (outside its "
                                        "measured size), so a runtime pays only for the libraries its "
                                        "models use (torch, onnxruntime, xgboost, lightgbm: about 250 MB).")
    warm_imports_timeout_s: float = _f(60.0, "Bound on importing the libraries of runtime.preload_types at "
                                       "start-up (torch takes 4-10 s on a busy 2-core pod); an import "
                                       "still running then finishes in the background and the first load "
                                       "waits for it, a failed one disables its type.", "s")
    # --- end issue 18 ---
    eviction_policy: str = _f("s3fifo+tinylfu", "Eviction policy from placement/ (`mesh sim run` compares "
                              "them on your traffic). The default missed least across the simulator's "
                              "Zipf grid, churn, sweeps, bursts and Azure-like traffic, never more than "
                              "LRU; lru is ModelMesh's behaviour, lru+churnguard ModelMesh's cache.")
    default_model_size_bytes: int = _f(64 * 1024, "A model's predicted size before its load when its size "
                                       "on disk is unknown (an unreadable file, or a model in storage "
                                       "not pulled yet whose key gives no disk_size_bytes). Known: the "
                                       "prediction is that size x the ratio learned for the type, with "
                                       "no floor (issue 18).", "bytes")
    size_ratio: float = _f(1.25, "Initial in-memory/on-disk size ratio per model type, refined after "
                           "each measured load (ModelMesh's adapters use a fixed 1.25).")
    inference_threads: int = _f(4, "Threads running model predict calls, so that one slow model does "
                                "not stall the event loop.")
    workers: int = _f(0, "Model worker processes that load and run the models, apart from the runtime, "
                      "which keeps the registry session and credentials (mesh.runtime.workers): a model "
                      "that crashes takes only its worker, and several workers predict on several "
                      "cores. 0: models run in the runtime's own process.")
    worker_memory_bytes: int = _f(0, "Memory one model worker's models may take beyond the libraries it "
                                  "imports (RLIMIT_DATA): a model that balloons while loading fails its "
                                  "own load instead of getting the pod OOM-killed. 0: the runtime's model "
                                  "capacity in RAM.", "bytes")
    predict_timeout_s: float = _f(60.0, "With model workers: a prediction taking longer ends its worker (the "
                                  "only way to stop model code that hangs or holds the interpreter) and "
                                  "answers DEADLINE_EXCEEDED; the worker's other models are lost with it. "
                                  "With an external server: the deadline of each forwarded request.", "s")
    server: str = _f("", "An external model server that loads and serves this runtime's models instead of "
                     "its built-in loaders (mesh.runtime.servers): mlserver, triton, or spi (any server of "
                     "ModelMesh's runtime SPI, mmesh.ModelRuntime). Empty: the built-in loaders.")
    server_address: str = _f("", "host:port of the external server's gRPC endpoint (V2 inference; the "
                             "repository API or the SPI on the same port), e.g. 127.0.0.1:8001.")
    server_repository: str = _f("", "mlserver and triton: the model repository directory the server was "
                                "started with, shared with the runtime (the same host or a volume both "
                                "containers mount). The runtime writes each model's entry there.")
    server_types: tuple[str, ...] = _f((), "Model types the external server serves (comma-separated in the "
                                       "environment); the runtime advertises exactly these. Empty: mlserver "
                                       "sklearn,xgboost,lightgbm; triton onnx; spi must name them.")
    inline_predict_ms: float = _f(0.0, "Models whose recent inferences took less than this run on the "
                                  "event loop instead of an inference thread (0: never). For clients "
                                  "that call runtimes directly, 1.0 gave +31 % throughput with small "
                                  "models; behind a router it gave none, because answers computed at "
                                  "once stop sharing stream writes, so it is off by default.", "ms")
    batch_max_size: int = _f(0, "Dynamic batching (mesh.runtime.batching): the most rows (first-dimension "
                             "elements) merged into one prediction of a copy in this process or in a model worker; "
                             "0 or 1: off. "
                             "Off by default: it trades up to batch_max_wait_ms of latency for throughput, "
                             "which only pays under concurrent traffic to one model. A registration's key "
                             "overrides it per model (batch_max_size).")
    batch_max_wait_ms: float = _f(2.0, "Dynamic batching: the longest a batch waits for more requests after "
                                  "its first; the latency a lone request pays. A registration's key overrides "
                                  "it per model (batch_max_wait_ms).", "ms")
    batch_max_queue: int = _f(1024, "Dynamic batching: requests waiting for a batch per copy, past which "
                              "requests are refused with RESOURCE_EXHAUSTED instead of queued.")
    labels: tuple[str, ...] = _f((), "Labels this instance offers; models requiring labels go only to "
                                 "instances that carry them all.")
    zone: str = _f("", "Failure zone of this instance, published for placement.")
    supported_types: tuple[str, ...] = _f((), "Model types this instance loads; empty means every "
                                          "built-in loader.")
    publish_interval_s: float = _f(2.0, "How often the instance record is refreshed when it changed "
                                   "(load and evict events publish at once).", "s")
    rehome_timeout_s: float = _f(20.0, "On SIGTERM, how long the runtime waits for copies of its "
                                 "recently used models to load on other instances before it drains and "
                                 "exits. 20 s + drain_timeout_s + unloading fits the pod's 60 s grace "
                                 "period (deploy/base/runtime.yaml) with its 5 s preStop.", "s")
    rehome_recent_s: float = _f(300.0, "Models used within this long before SIGTERM are re-homed "
                                "(loaded elsewhere before exit); older ones load elsewhere on their next "
                                "request. Five minutes: the models whose cold miss a client would notice.",
                                "s")
    rehome_max_models: int = _f(200, "Most models re-homed on one shutdown, most recently used first: "
                                "bounds the load storm on the survivors.")
    drain_timeout_s: float = _f(10.0, "On SIGTERM, after re-homing, how long in-flight requests may run "
                                "before the server stops (the slowest inference a client waits for).", "s")


@dataclass(frozen=True)
class ControllerSettings:
    router_endpoint: str = _f("127.0.0.1:8033", "Router the controller registers Predictors with (mmesh.ModelMesh "
                              "API), host:port; in Kubernetes, the router Service.")
    namespace: str = _f("", "Namespace whose Predictors are served; empty watches every namespace "
                        "(vModel IDs are Predictor names, so names must then be unique across "
                        "namespaces: a clash is reported in the second Predictor's status).")
    kubeconfig: str = _f("", "kubeconfig file; empty uses the in-cluster service account when "
                         "KUBERNETES_SERVICE_HOST is set, else ~/.kube/config (or KUBECONFIG).")
    api_server: str = _f("", "Plain http(s) URL of a Kubernetes API server used without "
                         "authentication (tests and local development); overrides kubeconfig.")
    workers: int = _f(16, "Objects of each kind (Predictors, InferenceServices) reconciled at once. Their "
                      "registrations issued within a few ms go to the router in one registerModels call "
                      "(up to 1,000), so a re-apply of many objects costs the router few calls.")
    resync_s: float = _f(30.0, "How often every Predictor's status is refreshed from the mesh and "
                         "lost registrations are restored (a wiped registry heals within this).", "s")
    inference_services: bool = _f(True, "Also serve InferenceServices (serving.kserve.io/v1beta1) annotated "
                                  "serving.kserve.io/deploymentMode: ModelMesh, as modelmesh-serving does; "
                                  "others are left to KServe. Needs the InferenceService CRD (KServe's, or "
                                  "deploy/crd).")
    inference_graphs: bool = _f(True, "Also serve InferenceGraphs (serving.kserve.io/v1alpha1) annotated "
                                "serving.kserve.io/deploymentMode: ModelMesh as graphs the routers run "
                                "(no pod per graph). Needs the InferenceGraph CRD (KServe's, or deploy/crd); "
                                "without it the watch finds none.")
    rest_endpoint: str = _f("", "host:port of the routers' REST port, written into InferenceService "
                            "statuses (restUrl); empty: the router_endpoint host on port 8008.")
    owner: str = _f("mesh-controller", "Owner recorded on the vModels the controller creates (with the "
                    "namespace appended); vModels of other owners are never changed.")
    default_storage_key: str = _f("", "Storage key (storage.config_dir) for Predictors that name no storage "
                                  "(no key, s3, parameters or persistentVolumeClaim) and give a relative path: "
                                  "modelmesh-serving's puller reads those from its `default` key, and deploy/ "
                                  "sets \"default\" to match. Empty: such paths are local files under the "
                                  "runtimes' model roots. Changing it gives those Predictors new model IDs.")
    watch_timeout_s: int = _f(300, "Length of one watch request; the watch then resumes from its last "
                              "resourceVersion (API servers end watches after 5-10 min anyway).", "s")
    backoff_max_s: float = _f(30.0, "Cap of the exponential back-off after failed API-server or "
                              "router calls (it starts at 0.5 s and doubles).", "s")
    router_ca_file: str = _f("", "CA bundle the router's certificate is verified with; setting it makes "
                             "the controller dial the router over TLS (empty: plaintext).")
    router_cert_file: str = _f("", "Client certificate presented to a router that requires one (tls."
                               "client_auth = require); needs router_key_file and router_ca_file.")
    router_key_file: str = _f("", "Private key of router_cert_file.")
    router_server_name: str = _f("", "Name expected in the router's certificate instead of the host of "
                                 "router_endpoint. Empty: that host.")
    router_token_file: str = _f("", "File holding the bearer token the controller sends to a router with "
                                "auth.tokens_file set (a write token; mount it from a Secret). Read once at "
                                "start-up, never logged. Empty: no token.")
    namespace_label: str = _f("", "With namespace empty (cluster scope): serve only namespaces whose label of this "
                              "name is \"true\", and the controller's own (POD_NAMESPACE) unless labelled otherwise: "
                              "modelmesh-serving's modelmesh-enabled. Objects elsewhere are left alone (their "
                              "vModels removed). Empty: every namespace. Needs list/watch on namespaces.")
    serving_runtimes: bool = _f(True, "Read ServingRuntimes and ClusterServingRuntimes (serving.kserve.io/"
                                "v1alpha1, multi-model ones only) and send each model to the runtime KServe "
                                "would select (mesh.controller.runtimes). Without the CRDs, or with no "
                                "multi-model runtime, models go to any runtime loading their type.")
    manage_runtimes: bool = _f(False, "Run each ServingRuntime in use as a StatefulSet of mesh runtime pods "
                               "(mesh.controller.workloads) in workload_namespace; off: the runtime pods are "
                               "deployed by hand (deploy/base's mesh-runtime StatefulSet).")
    workload_namespace: str = _f("", "Namespace of the runtime StatefulSets the controller manages (the "
                                 "mesh's: etcd, the mesh-config ConfigMap, the runtimes' certificates). Empty: "
                                 "the controller's own namespace (POD_NAMESPACE), else namespace.")
    runtime_image: str = _f("ghcr.io/mesh-serving/mesh:0.1.0", "Image of the mesh runtime container in managed "
                            "runtime pods (beside an MLServer, Triton or SPI server container).")
    pods_per_runtime: int = _f(2, "Replicas of a managed runtime in use, unless its spec.replicas says "
                               "otherwise (modelmesh-serving's podsPerRuntime).")
    scale_to_zero: bool = _f(True, "Scale a managed runtime that serves no model to 0 replicas after "
                             "scale_to_zero_grace_s, and back up at its first model (modelmesh-serving's "
                             "scaleToZero).")
    scale_to_zero_grace_s: float = _f(60.0, "How long a managed runtime stays up without models.", "s")


@dataclass(frozen=True)
class TlsSettings:
    """TLS of this process's gRPC port (the router's or a runtime's: the V2 data plane, the management
    API or the runtime SPI, and grpc.health.v1 on the same port), and of the router's connections to
    runtimes. Everything empty: plaintext, as before (docs/security.md). Files are PEM, read once at
    start-up; a missing or unreadable one stops the start with one line naming the setting."""

    cert_file: str = _f("", "Certificate chain this process's gRPC port presents; empty serves plaintext. "
                        "Needs key_file.")
    key_file: str = _f("", "Private key of cert_file.")
    client_ca_file: str = _f("", "CA bundle client certificates are verified with; required by "
                             "client_auth = require.")
    client_auth: str = _f("none", "none: any client may connect (tokens, if any, decide what it may do); "
                          "require: only clients with a certificate signed by client_ca_file (mTLS). "
                          "require on runtimes keeps everyone but the routers off the runtime port.")
    allowed_peers: tuple[str, ...] = _f((), "With client_auth = require: the certificate names (common name "
                                        "or DNS name) of the clients this port accepts; any other client "
                                        "certificate, even one client_ca_file signed, gets PERMISSION_DENIED. "
                                        "On runtimes, the routers' (and runtimes', which re-home to each "
                                        "other) names: then runtimes also trust the registration a router "
                                        "sends with a cold request. Empty: any certificate the CA signed.")
    runtime_ca_file: str = _f("", "At the router: CA bundle runtimes' certificates are verified with; "
                              "setting it makes the router dial runtimes over TLS (empty: plaintext, for "
                              "runtimes serving without cert_file).")
    runtime_cert_file: str = _f("", "At the router: client certificate presented to runtimes that require "
                                "one (mTLS); needs runtime_key_file.")
    runtime_key_file: str = _f("", "Private key of runtime_cert_file.")
    runtime_server_name: str = _f("", "Name expected in runtimes' certificates instead of the host the "
                                  "router dials (runtimes advertise pod IPs; certificates usually name a "
                                  "Service or a wildcard). Empty: the dialled host.")


@dataclass(frozen=True)
class AuthSettings:
    """Bearer-token authorization at the router (docs/security.md). Off unless tokens_file is set."""

    tokens_file: str = _f("", "Tokens file (TOML: [[token]] tables with sha256 or token, name, role = "
                          "read|write, optional prefixes). Set: every management call needs "
                          "`authorization: Bearer <token>`. Empty: no authorization, anyone who can "
                          "reach the port may manage models (the default, as in ModelMesh).")
    data_plane: bool = _f(False, "Also require a token for the V2 data plane at the router (inference, "
                          "model metadata/readiness; ServerLive/ServerReady and grpc.health.v1 stay "
                          "open). Off by default: inference is usually kept inside the cluster network "
                          "and a token check costs every request. Needs tokens_file.")


@dataclass(frozen=True)
class LogSettings:
    level: str = _f("info", "Log level: debug, info, warning, error.")
    format: str = _f("auto", "auto (readable on a terminal, JSON otherwise), json or console.")
    access_log: bool = _f(False, "One line per request: at the router per forwarded request (method, model, "
                          "code, duration, request id, bytes in/out), at a runtime per inference, at info level. "
                          "Off by default: at thousands of requests per second it is most of the log volume.")
    tracing: str = _f("off", "off, or otel: a span per forwarded request at the router and per inference at "
                      "the runtime (needs the `tracing` extra; spans go to the OpenTelemetry SDK's console "
                      "exporter unless the process installed its own tracer provider). W3C traceparent "
                      "headers are passed on either way.")


@dataclass(frozen=True)
class StorageSettings:
    config_dir: str = _f("", "Directory of storage keys, one JSON file per key, as modelmesh-serving mounts its "
                         "storage-config Secret (deploy/ mounts it at /storage-config). Keys added or changed "
                         "there are used without a restart. Empty: no keys (public objects and URIs only).")
    cache_dir: str = _f("", "Where a runtime keeps the models it pulled from object storage (one folder per "
                        "object version; an evicted model reloads from here without a download). Empty: "
                        "<temp dir>/mesh-storage-<uid>. Give it a volume that outlives the process "
                        "(deploy/: an emptyDir).")
    cache_bytes: int = _f(10 * 1024 * _MIB, "Bound on the disk cache; the least recently used models not in "
                          "use are deleted to make room. A model larger than this fails its load naming "
                          "this setting.", "bytes")
    pvc_mounts_dir: str = _f("/pvc_mounts", "Where persistent volume claims are mounted, one folder per claim "
                             "(modelmesh-serving's /pvc_mounts); type pvc keys read <dir>/<name>/<path> "
                             "without copying.")
    retries: int = _f(3, "Further attempts of a download that failed for a reason that may pass (endpoint "
                      "unreachable, timeout, 5xx), with exponential backoff from 0.5 s; access denied "
                      "and not found fail at once.")
    connect_timeout_s: float = _f(5.0, "Deadline for connecting to a store.", "s")
    max_files: int = _f(10_000, "Most objects one model may consist of (an S3 prefix lists them all) and most "
                        "entries an archive may unpack to.")
    range_bytes: int = _f(64 * _MIB, "Objects larger than this download in parallel ranges of this size (4 "
                          "at a time) where the store answers ranges; 0: always one stream. On 2 shared "
                          "cores ranges did not help (BENCHMARKS.md), so only large objects use them.",
                          "bytes")


@dataclass(frozen=True)
class Settings:
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    router: RouterSettings = field(default_factory=RouterSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    log: LogSettings = field(default_factory=LogSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)


# Variables of the CLI's own (mesh model/infer...: mesh.cli.main), not settings: a shell that exports
# them for the CLI must still be able to run `mesh serve` and `mesh up`.
CLI_VARIABLES = frozenset({"MESH_CONFIG", "MESH_ROUTER", "MESH_TOKEN", "MESH_TOKEN_FILE", "MESH_TLS_CA",
                           "MESH_TLS_CERT", "MESH_TLS_KEY", "MESH_TLS_SERVER_NAME", "MESH_PARENT_PID"})

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "ki": 1024, "kib": 1024, "mi": 1024**2,
          "mib": 1024**2, "gi": 1024**3, "gib": 1024**3, "ti": 1024**4, "tib": 1024**4}


def parse_bytes(text: str) -> int:
    """``"512MiB"`` -> 536870912; plain numbers are bytes."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a byte size: {text!r} (examples: 1048576, 512MiB, 2GiB, 1.5GB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def _coerce(tp: Any, value: Any, name: str) -> Any:
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            low = str(value).strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if tp is int:
            if isinstance(value, bool):
                raise ValueError("not an integer")
            if isinstance(value, int):
                return value
            return parse_bytes(str(value)) if name.endswith("_bytes") else int(str(value))
        if tp is float:
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError(f"not a string: {value!r}")
            return value
        if typing.get_origin(tp) is tuple:
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            if isinstance(value, list | tuple):
                return tuple(str(v) for v in value)
            raise ValueError(f"not a list: {value!r}")
    except ValueError as exc:
        raise InvalidArgument(f"setting {name}: {exc}") from None
    raise InvalidArgument(f"setting {name}: unsupported type {tp}")


def _group_types() -> dict[str, type]:
    hints = typing.get_type_hints(Settings)
    return {f.name: hints[f.name] for f in dataclasses.fields(Settings)}


def load_settings(
    config_file: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Build the settings from defaults, file, environment and overrides (in that order)."""
    env = os.environ if env is None else env
    layers: list[tuple[str, dict[str, dict[str, Any]]]] = []
    path = config_file or env.get("MESH_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidArgument(f"config file {path}: {exc}") from None
        layers.append((f"config file {path}", data))
    groups = _group_types()
    env_layer: dict[str, dict[str, Any]] = {}
    for key, value in env.items():
        if not key.startswith("MESH_") or key in CLI_VARIABLES:
            continue
        rest = key[5:].lower()
        group = next((g for g in groups if rest.startswith(g + "_")), None)
        if group is None:
            continue  # MESH_* variables of other tools are not ours to reject
        env_layer.setdefault(group, {})[rest[len(group) + 1:]] = value
    layers.append(("environment", env_layer))
    if overrides:
        layers.append(("overrides", {g: dict(v) for g, v in overrides.items()}))

    values: dict[str, dict[str, Any]] = {g: {} for g in groups}
    for source, layer in layers:
        for group, items in layer.items():
            if group not in groups:
                raise InvalidArgument(f"{source}: unknown settings group [{group}]; "
                                      f"known: {', '.join(groups)}")
            if not isinstance(items, dict):
                raise InvalidArgument(f"{source}: [{group}] must be a table")
            hints = typing.get_type_hints(groups[group])
            for name, value in items.items():
                if name not in hints:
                    raise InvalidArgument(f"{source}: unknown setting {group}.{name}; known: "
                                          f"{', '.join(hints)}")
                values[group][name] = _coerce(hints[name], value, f"{group}.{name}")
    return Settings(**{g: groups[g](**values[g]) for g in groups})


def describe() -> list[tuple[str, str, str, str]]:
    """(name, default, unit, doc) for every setting, for ``mesh settings`` and the README."""
    rows = []
    for group, cls in _group_types().items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else ""
            rows.append((f"{group}.{f.name}", repr(default), f.metadata.get("unit", ""),
                         f.metadata.get("doc", "")))
    return rows


def with_changes(settings: Settings, **groups: Mapping[str, Any]) -> Settings:
    """A copy of ``settings`` with some fields of some groups replaced (used by `mesh up`)."""
    changed = {g: dataclasses.replace(getattr(settings, g), **dict(v)) for g, v in groups.items()}
    return dataclasses.replace(settings, **changed)


__all__ = ["AuthSettings", "ControllerSettings", "LogSettings", "RegistrySettings", "RouterSettings",
           "RuntimeSettings", "Settings", "StorageSettings", "TlsSettings",
           "describe", "load_settings", "parse_bytes", "with_changes"]
