from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]

class TableKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TABLE_KIND_UNSPECIFIED: _ClassVar[TableKind]
    TABLE_KIND_DYNAMIC: _ClassVar[TableKind]
    TABLE_KIND_STATIC: _ClassVar[TableKind]
    TABLE_KIND_ADAPTIVE: _ClassVar[TableKind]
    TABLE_KIND_QR: _ClassVar[TableKind]

class Eviction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVICTION_UNSPECIFIED: _ClassVar[Eviction]
    EVICTION_NONE: _ClassVar[Eviction]
    EVICTION_LFU: _ClassVar[Eviction]
    EVICTION_LRU: _ClassVar[Eviction]

class Combiner(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMBINER_UNSPECIFIED: _ClassVar[Combiner]
    COMBINER_MULT: _ClassVar[Combiner]
    COMBINER_ADD: _ClassVar[Combiner]
    COMBINER_CONCAT: _ClassVar[Combiner]

class Norm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NORM_UNSPECIFIED: _ClassVar[Norm]
    NORM_L2: _ClassVar[Norm]
    NORM_L1: _ClassVar[Norm]
    NORM_LINF: _ClassVar[Norm]

class CheckpointKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKPOINT_KIND_UNSPECIFIED: _ClassVar[CheckpointKind]
    CHECKPOINT_KIND_FULL: _ClassVar[CheckpointKind]
    CHECKPOINT_KIND_INCREMENTAL: _ClassVar[CheckpointKind]

class InitializerKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INITIALIZER_UNSPECIFIED: _ClassVar[InitializerKind]
    INITIALIZER_ZEROS: _ClassVar[InitializerKind]
    INITIALIZER_CONSTANT: _ClassVar[InitializerKind]
    INITIALIZER_UNIFORM: _ClassVar[InitializerKind]
    INITIALIZER_NORMAL: _ClassVar[InitializerKind]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
TABLE_KIND_UNSPECIFIED: TableKind
TABLE_KIND_DYNAMIC: TableKind
TABLE_KIND_STATIC: TableKind
TABLE_KIND_ADAPTIVE: TableKind
TABLE_KIND_QR: TableKind
EVICTION_UNSPECIFIED: Eviction
EVICTION_NONE: Eviction
EVICTION_LFU: Eviction
EVICTION_LRU: Eviction
COMBINER_UNSPECIFIED: Combiner
COMBINER_MULT: Combiner
COMBINER_ADD: Combiner
COMBINER_CONCAT: Combiner
NORM_UNSPECIFIED: Norm
NORM_L2: Norm
NORM_L1: Norm
NORM_LINF: Norm
CHECKPOINT_KIND_UNSPECIFIED: CheckpointKind
CHECKPOINT_KIND_FULL: CheckpointKind
CHECKPOINT_KIND_INCREMENTAL: CheckpointKind
INITIALIZER_UNSPECIFIED: InitializerKind
INITIALIZER_ZEROS: InitializerKind
INITIALIZER_CONSTANT: InitializerKind
INITIALIZER_UNIFORM: InitializerKind
INITIALIZER_NORMAL: InitializerKind

class Initializer(_message.Message):
    __slots__ = ("kind", "a", "b")
    KIND_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    kind: InitializerKind
    a: float
    b: float
    def __init__(self, kind: _Optional[_Union[InitializerKind, str]] = ..., a: _Optional[float] = ..., b: _Optional[float] = ...) -> None: ...

class Sgd(_message.Message):
    __slots__ = ("lr",)
    LR_FIELD_NUMBER: _ClassVar[int]
    lr: float
    def __init__(self, lr: _Optional[float] = ...) -> None: ...

class Adagrad(_message.Message):
    __slots__ = ("lr", "initial_accumulator_value", "eps")
    LR_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ACCUMULATOR_VALUE_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    lr: float
    initial_accumulator_value: float
    eps: float
    def __init__(self, lr: _Optional[float] = ..., initial_accumulator_value: _Optional[float] = ..., eps: _Optional[float] = ...) -> None: ...

class Adam(_message.Message):
    __slots__ = ("lr", "beta1", "beta2", "eps")
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    lr: float
    beta1: float
    beta2: float
    eps: float
    def __init__(self, lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ...) -> None: ...

class Ftrl(_message.Message):
    __slots__ = ("alpha", "beta", "l1", "l2", "initial_accumulator_value")
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    L1_FIELD_NUMBER: _ClassVar[int]
    L2_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ACCUMULATOR_VALUE_FIELD_NUMBER: _ClassVar[int]
    alpha: float
    beta: float
    l1: float
    l2: float
    initial_accumulator_value: float
    def __init__(self, alpha: _Optional[float] = ..., beta: _Optional[float] = ..., l1: _Optional[float] = ..., l2: _Optional[float] = ..., initial_accumulator_value: _Optional[float] = ...) -> None: ...

class Optimizer(_message.Message):
    __slots__ = ("sgd", "adagrad", "adam", "ftrl")
    SGD_FIELD_NUMBER: _ClassVar[int]
    ADAGRAD_FIELD_NUMBER: _ClassVar[int]
    ADAM_FIELD_NUMBER: _ClassVar[int]
    FTRL_FIELD_NUMBER: _ClassVar[int]
    sgd: Sgd
    adagrad: Adagrad
    adam: Adam
    ftrl: Ftrl
    def __init__(self, sgd: _Optional[_Union[Sgd, _Mapping]] = ..., adagrad: _Optional[_Union[Adagrad, _Mapping]] = ..., adam: _Optional[_Union[Adam, _Mapping]] = ..., ftrl: _Optional[_Union[Ftrl, _Mapping]] = ...) -> None: ...

class TableConfig(_message.Message):
    __slots__ = ("name", "dim", "kind", "optimizer", "initializer", "seed", "initial_capacity", "admission_threshold", "default_value", "max_rows", "eviction", "steps_to_live", "l2_evict_threshold", "max_bytes", "hash_bucket_size", "promote_threshold", "sketch_width", "sketch_depth", "qr_quotient_buckets", "qr_remainder_buckets", "qr_combiner")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    INITIALIZER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INITIAL_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    EVICTION_FIELD_NUMBER: _ClassVar[int]
    STEPS_TO_LIVE_FIELD_NUMBER: _ClassVar[int]
    L2_EVICT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    HASH_BUCKET_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROMOTE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SKETCH_WIDTH_FIELD_NUMBER: _ClassVar[int]
    SKETCH_DEPTH_FIELD_NUMBER: _ClassVar[int]
    QR_QUOTIENT_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    QR_REMAINDER_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    QR_COMBINER_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    kind: TableKind
    optimizer: Optimizer
    initializer: Initializer
    seed: int
    initial_capacity: int
    admission_threshold: int
    default_value: float
    max_rows: int
    eviction: Eviction
    steps_to_live: int
    l2_evict_threshold: float
    max_bytes: int
    hash_bucket_size: int
    promote_threshold: int
    sketch_width: int
    sketch_depth: int
    qr_quotient_buckets: int
    qr_remainder_buckets: int
    qr_combiner: Combiner
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., kind: _Optional[_Union[TableKind, str]] = ..., optimizer: _Optional[_Union[Optimizer, _Mapping]] = ..., initializer: _Optional[_Union[Initializer, _Mapping]] = ..., seed: _Optional[int] = ..., initial_capacity: _Optional[int] = ..., admission_threshold: _Optional[int] = ..., default_value: _Optional[float] = ..., max_rows: _Optional[int] = ..., eviction: _Optional[_Union[Eviction, str]] = ..., steps_to_live: _Optional[int] = ..., l2_evict_threshold: _Optional[float] = ..., max_bytes: _Optional[int] = ..., hash_bucket_size: _Optional[int] = ..., promote_threshold: _Optional[int] = ..., sketch_width: _Optional[int] = ..., sketch_depth: _Optional[int] = ..., qr_quotient_buckets: _Optional[int] = ..., qr_remainder_buckets: _Optional[int] = ..., qr_combiner: _Optional[_Union[Combiner, str]] = ...) -> None: ...

class TableStats(_message.Message):
    __slots__ = ("name", "keys", "dynamic_rows", "static_rows", "bytes", "dynamic_bytes", "static_bytes", "load_factor", "promotions", "admissions_rejected", "evictions", "pruned_rows", "pulled_rows", "pushed_rows", "pulled_static", "pulled_dynamic", "step", "evictions_steps_to_live", "evictions_l2", "evictions_capacity")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    DYNAMIC_ROWS_FIELD_NUMBER: _ClassVar[int]
    STATIC_ROWS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    DYNAMIC_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATIC_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_FACTOR_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    ADMISSIONS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    PRUNED_ROWS_FIELD_NUMBER: _ClassVar[int]
    PULLED_ROWS_FIELD_NUMBER: _ClassVar[int]
    PUSHED_ROWS_FIELD_NUMBER: _ClassVar[int]
    PULLED_STATIC_FIELD_NUMBER: _ClassVar[int]
    PULLED_DYNAMIC_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_STEPS_TO_LIVE_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_L2_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    keys: int
    dynamic_rows: int
    static_rows: int
    bytes: int
    dynamic_bytes: int
    static_bytes: int
    load_factor: float
    promotions: int
    admissions_rejected: int
    evictions: int
    pruned_rows: int
    pulled_rows: int
    pushed_rows: int
    pulled_static: int
    pulled_dynamic: int
    step: int
    evictions_steps_to_live: int
    evictions_l2: int
    evictions_capacity: int
    def __init__(self, name: _Optional[str] = ..., keys: _Optional[int] = ..., dynamic_rows: _Optional[int] = ..., static_rows: _Optional[int] = ..., bytes: _Optional[int] = ..., dynamic_bytes: _Optional[int] = ..., static_bytes: _Optional[int] = ..., load_factor: _Optional[float] = ..., promotions: _Optional[int] = ..., admissions_rejected: _Optional[int] = ..., evictions: _Optional[int] = ..., pruned_rows: _Optional[int] = ..., pulled_rows: _Optional[int] = ..., pushed_rows: _Optional[int] = ..., pulled_static: _Optional[int] = ..., pulled_dynamic: _Optional[int] = ..., step: _Optional[int] = ..., evictions_steps_to_live: _Optional[int] = ..., evictions_l2: _Optional[int] = ..., evictions_capacity: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("table", "keys", "train", "num_shards", "dtype", "mask")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    table: str
    keys: bytes
    train: bool
    num_shards: int
    dtype: DType
    mask: bytes
    def __init__(self, table: _Optional[str] = ..., keys: _Optional[bytes] = ..., train: _Optional[bool] = ..., num_shards: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., mask: _Optional[bytes] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("values", "dim", "dtype")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    values: bytes
    dim: int
    dtype: DType
    def __init__(self, values: _Optional[bytes] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("table", "keys", "grads", "dtype", "step", "num_shards", "client_id", "sequence")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    table: str
    keys: bytes
    grads: bytes
    dtype: DType
    step: int
    num_shards: int
    client_id: str
    sequence: int
    def __init__(self, table: _Optional[str] = ..., keys: _Optional[bytes] = ..., grads: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ..., step: _Optional[int] = ..., num_shards: _Optional[int] = ..., client_id: _Optional[str] = ..., sequence: _Optional[int] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("applied", "dropped", "replayed")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    applied: int
    dropped: int
    replayed: bool
    def __init__(self, applied: _Optional[int] = ..., dropped: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class TableGroup(_message.Message):
    __slots__ = ("table", "keys", "grads", "mask")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    table: str
    keys: bytes
    grads: bytes
    mask: bytes
    def __init__(self, table: _Optional[str] = ..., keys: _Optional[bytes] = ..., grads: _Optional[bytes] = ..., mask: _Optional[bytes] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("num_shards", "dtype", "push", "step", "pull", "train", "client_id", "sequence")
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    num_shards: int
    dtype: DType
    push: _containers.RepeatedCompositeFieldContainer[TableGroup]
    step: int
    pull: _containers.RepeatedCompositeFieldContainer[TableGroup]
    train: bool
    client_id: str
    sequence: int
    def __init__(self, num_shards: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., push: _Optional[_Iterable[_Union[TableGroup, _Mapping]]] = ..., step: _Optional[int] = ..., pull: _Optional[_Iterable[_Union[TableGroup, _Mapping]]] = ..., train: _Optional[bool] = ..., client_id: _Optional[str] = ..., sequence: _Optional[int] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("values", "dims", "dtype", "applied", "dropped", "replayed")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    values: bytes
    dims: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    applied: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    replayed: bool
    def __init__(self, values: _Optional[bytes] = ..., dims: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., applied: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[int]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class ChangesRequest(_message.Message):
    __slots__ = ("table", "num_shards", "since_version", "cursor", "max_rows", "epoch", "follower")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    SINCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FOLLOWER_FIELD_NUMBER: _ClassVar[int]
    table: str
    num_shards: int
    since_version: int
    cursor: int
    max_rows: int
    epoch: str
    follower: str
    def __init__(self, table: _Optional[str] = ..., num_shards: _Optional[int] = ..., since_version: _Optional[int] = ..., cursor: _Optional[int] = ..., max_rows: _Optional[int] = ..., epoch: _Optional[str] = ..., follower: _Optional[str] = ...) -> None: ...

class ChangesResponse(_message.Message):
    __slots__ = ("epoch", "version", "step", "part", "keys", "rows", "values", "deleted", "next_cursor", "resync")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    epoch: str
    version: int
    step: int
    part: int
    keys: bytes
    rows: bytes
    values: bytes
    deleted: bytes
    next_cursor: int
    resync: bool
    def __init__(self, epoch: _Optional[str] = ..., version: _Optional[int] = ..., step: _Optional[int] = ..., part: _Optional[int] = ..., keys: _Optional[bytes] = ..., rows: _Optional[bytes] = ..., values: _Optional[bytes] = ..., deleted: _Optional[bytes] = ..., next_cursor: _Optional[int] = ..., resync: _Optional[bool] = ...) -> None: ...

class CreateTableRequest(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: TableConfig
    def __init__(self, config: _Optional[_Union[TableConfig, _Mapping]] = ...) -> None: ...

class CreateTableResponse(_message.Message):
    __slots__ = ("created",)
    CREATED_FIELD_NUMBER: _ClassVar[int]
    created: bool
    def __init__(self, created: _Optional[bool] = ...) -> None: ...

class DescribeTablesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeTablesResponse(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableConfig]
    def __init__(self, tables: _Optional[_Iterable[_Union[TableConfig, _Mapping]]] = ...) -> None: ...

class DropTableRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DropTableResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: bool
    def __init__(self, dropped: _Optional[bool] = ...) -> None: ...

class PruneRequest(_message.Message):
    __slots__ = ("table", "threshold", "norm", "num_shards")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    table: str
    threshold: float
    norm: Norm
    num_shards: int
    def __init__(self, table: _Optional[str] = ..., threshold: _Optional[float] = ..., norm: _Optional[_Union[Norm, str]] = ..., num_shards: _Optional[int] = ...) -> None: ...

class PruneResponse(_message.Message):
    __slots__ = ("rows_freed", "bytes_freed")
    ROWS_FREED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    rows_freed: int
    bytes_freed: int
    def __init__(self, rows_freed: _Optional[int] = ..., bytes_freed: _Optional[int] = ...) -> None: ...

class NarrowRequest(_message.Message):
    __slots__ = ("table", "dim", "num_shards")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    table: str
    dim: int
    num_shards: int
    def __init__(self, table: _Optional[str] = ..., dim: _Optional[int] = ..., num_shards: _Optional[int] = ...) -> None: ...

class NarrowResponse(_message.Message):
    __slots__ = ("old_dim", "dim", "bytes_freed")
    OLD_DIM_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    old_dim: int
    dim: int
    bytes_freed: int
    def __init__(self, old_dim: _Optional[int] = ..., dim: _Optional[int] = ..., bytes_freed: _Optional[int] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("table", "num_shards")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    table: str
    num_shards: int
    def __init__(self, table: _Optional[str] = ..., num_shards: _Optional[int] = ...) -> None: ...

class TableEviction(_message.Message):
    __slots__ = ("table", "rows", "bytes", "steps_to_live_rows", "l2_rows", "seconds")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    STEPS_TO_LIVE_ROWS_FIELD_NUMBER: _ClassVar[int]
    L2_ROWS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    table: str
    rows: int
    bytes: int
    steps_to_live_rows: int
    l2_rows: int
    seconds: float
    def __init__(self, table: _Optional[str] = ..., rows: _Optional[int] = ..., bytes: _Optional[int] = ..., steps_to_live_rows: _Optional[int] = ..., l2_rows: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableEviction]
    def __init__(self, tables: _Optional[_Iterable[_Union[TableEviction, _Mapping]]] = ...) -> None: ...

class FrequenciesRequest(_message.Message):
    __slots__ = ("table", "keys", "num_shards")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    table: str
    keys: bytes
    num_shards: int
    def __init__(self, table: _Optional[str] = ..., keys: _Optional[bytes] = ..., num_shards: _Optional[int] = ...) -> None: ...

class FrequenciesResponse(_message.Message):
    __slots__ = ("counts",)
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    counts: bytes
    def __init__(self, counts: _Optional[bytes] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("table",)
    TABLE_FIELD_NUMBER: _ClassVar[int]
    table: str
    def __init__(self, table: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("shard_id", "num_shards", "tables", "replica_of", "lag_seconds", "resyncs")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    REPLICA_OF_FIELD_NUMBER: _ClassVar[int]
    LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESYNCS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    num_shards: int
    tables: _containers.RepeatedCompositeFieldContainer[TableStats]
    replica_of: str
    lag_seconds: float
    resyncs: int
    def __init__(self, shard_id: _Optional[int] = ..., num_shards: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableStats, _Mapping]]] = ..., replica_of: _Optional[str] = ..., lag_seconds: _Optional[float] = ..., resyncs: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("step", "kind", "num_shards")
    STEP_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    kind: CheckpointKind
    num_shards: int
    def __init__(self, step: _Optional[int] = ..., kind: _Optional[_Union[CheckpointKind, str]] = ..., num_shards: _Optional[int] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("shard_id", "num_shards", "step", "path", "kind", "base_step", "tables", "bytes", "seconds")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BASE_STEP_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    num_shards: int
    step: int
    path: str
    kind: CheckpointKind
    base_step: int
    tables: int
    bytes: int
    seconds: float
    def __init__(self, shard_id: _Optional[int] = ..., num_shards: _Optional[int] = ..., step: _Optional[int] = ..., path: _Optional[str] = ..., kind: _Optional[_Union[CheckpointKind, str]] = ..., base_step: _Optional[int] = ..., tables: _Optional[int] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...
