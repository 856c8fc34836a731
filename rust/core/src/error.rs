//! The one error type of the core. Every variant carries what a user needs to find the problem:
//! the file (or in-memory model label) and the tensor, never just "invalid input".

use std::path::PathBuf;

/// Everything that can go wrong in reading, planning, merging or writing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system failure on one path (open, map, write, rename, ...), always the
    /// user's path, never a temporary one.
    #[error("{}: {}", path.display(), describe_io(source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file-level problem in a safetensors header or a shard index.
    #[error("{file}: invalid header: {reason}")]
    Header { file: String, reason: String },
    /// A directory that holds no weights in a layout weightweave reads.
    #[error("{file}: {reason}")]
    NotAModel { file: String, reason: String },
    /// A well-formed checkpoint whose content is not weights weightweave reads (a training
    /// checkpoint without a model entry, a pickled module it cannot name the tensors of).
    #[error("{file}: {reason}")]
    Checkpoint { file: String, reason: String },
    /// A problem with one tensor's header entry (dtype, shape, offsets).
    #[error("{file}: tensor '{tensor}': {reason}")]
    TensorHeader {
        file: String,
        tensor: String,
        reason: String,
    },
    /// A tensor of the base is absent from a fine-tuned model.
    #[error("{file}: tensor '{tensor}' of the base is missing{hint}")]
    MissingTensor {
        file: String,
        tensor: String,
        /// The other tensors not shared, and the option that copies the base's (or empty).
        hint: String,
    },
    /// A fine-tuned model holds a tensor the base does not.
    #[error("{file}: tensor '{tensor}' is not in the base{hint}")]
    ExtraTensor {
        file: String,
        tensor: String,
        hint: String,
    },
    /// Same tensor name, different shape than the base.
    #[error("{file}: tensor '{tensor}' has shape {got:?}, the base has {expected:?}{hint}")]
    ShapeMismatch {
        file: String,
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
        hint: String,
    },
    /// Same tensor name, a dtype that cannot be merged with the base's.
    #[error("{file}: tensor '{tensor}' has dtype {got}, incompatible with the base's {expected}")]
    DtypeMismatch {
        file: String,
        tensor: String,
        expected: &'static str,
        got: &'static str,
    },
    /// NaN or infinity in an input: merging it would silently poison the output.
    #[error("{file}: tensor '{tensor}' holds a non-finite value ({value}) at element {index}")]
    NonFinite {
        file: String,
        tensor: String,
        index: usize,
        value: f32,
    },
    /// Weights stored in a quantized form the arithmetic cannot read.
    #[error("{file}: tensor '{tensor}': {format} cannot be merged; merge unquantized (or dequantized) checkpoints")]
    Quantized {
        file: String,
        tensor: String,
        format: String,
    },
    /// A merged value does not fit the output dtype (it would be written as infinity).
    #[error("tensor '{tensor}': merged values overflow {dtype} (largest {dtype} is {max:e}); write a wider out_dtype such as f32")]
    Overflow {
        tensor: String,
        dtype: &'static str,
        max: f32,
    },
    /// Re-quantizing merged FP8 weights needs a scale larger than the scale tensor's dtype
    /// holds (it would be written as infinity and the model would load as NaN).
    #[error("tensor '{tensor}': merged values up to {amax:e} need an FP8 scale above the largest {dtype} ({max:e}); write the weights dequantized with out_dtype (e.g. bf16) or use a smaller λ")]
    ScaleOverflow {
        tensor: String,
        dtype: &'static str,
        max: f32,
        amax: f32,
    },
    /// A merged value exceeds f32, the precision all arithmetic runs in, whatever the output
    /// dtype (λ or the weights are too large for these inputs).
    #[error("tensor '{tensor}': merged values exceed the f32 range of the arithmetic (about 3.4e38); use a smaller λ")]
    ArithmeticOverflow { tensor: String },
    /// A finite input value that f32, the precision of the arithmetic, cannot hold.
    #[error("{file}: tensor '{tensor}' holds {value:e} at element {index}, beyond the f32 range of the arithmetic (about 3.4e38)")]
    OutOfRange {
        file: String,
        tensor: String,
        index: usize,
        value: f64,
    },
    /// An input value the config's load dtype (mergekit's `dtype`) cannot hold: loaded in it,
    /// mergekit would merge an infinity.
    #[error("{file}: tensor '{tensor}' holds {value:e} at element {index}, beyond {dtype}, the dtype the inputs are loaded in (the config's dtype); load them in a wider dtype such as float32")]
    LoadOverflow {
        file: String,
        tensor: String,
        index: usize,
        value: f32,
        dtype: &'static str,
    },
    /// A user-defined pool function raised or returned something unusable.
    #[error("the pool function failed on tensor '{tensor}': {reason}")]
    PoolFunction { tensor: String, reason: String },
    /// A method name the core does not implement.
    #[error("unknown method '{name}' (known: {known})")]
    UnknownMethod { name: String, known: &'static str },
    /// A parameter that is unknown, of the wrong type or out of range.
    #[error("parameter '{name}': {reason}")]
    InvalidParam { name: String, reason: String },
    /// The output would replace one of the inputs.
    #[error("refusing to write {}: it is the input {}", out.display(), input.display())]
    OutputIsInput { out: PathBuf, input: PathBuf },
    /// The output location cannot be used as asked.
    #[error("{}: {reason}", path.display())]
    BadOutput { path: PathBuf, reason: String },
    /// Another run is writing the same output.
    #[error("{}: another weightweave run is writing this output ({holder}); wait for it, or remove {} if no such run exists", path.display(), lock.display())]
    Locked {
        path: PathBuf,
        holder: String,
        lock: PathBuf,
    },
    /// An input changed while the merge read it: the result would mix two versions.
    #[error("{}: the input changed while the merge ran ({what}); nothing was written", path.display())]
    InputChanged { path: PathBuf, what: String },
    /// A node of a cluster merge does not see the inputs or the output's staging area as the
    /// driver does (no shared file system).
    #[error("{reason}")]
    NotShared { reason: String },
    /// A process of a cluster merge reached a statistics pass it cannot finish alone (see
    /// `pipeline::exchange`); never reported to a user.
    #[error("internal error: a cluster pass was suspended (please report it)")]
    Suspended,
    /// A bug: an invariant of the engine did not hold. Reported, never a crash.
    #[error("internal error: {what} (please report it)")]
    Internal { what: String },
    /// The caller asked to stop (Ctrl-C, or an exception in the progress callback).
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T> = std::result::Result<T, Error>;

/// An OS error in words a user can act on, for the cases whose raw message misleads.
fn describe_io(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENODEV) => "not a regular file (cannot be memory-mapped)".into(),
        Some(libc::EISDIR) => "is a directory".into(),
        Some(libc::ENOTDIR) => "a component of the path is not a directory".into(),
        Some(libc::ELOOP) => "is a symbolic link, or one that loops".into(),
        Some(libc::ENAMETOOLONG) => "the path or one of its names is too long".into(),
        _ => e.to_string(),
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn header(file: &str, reason: impl Into<String>) -> Self {
        Error::Header {
            file: file.to_owned(),
            reason: reason.into(),
        }
    }

    pub(crate) fn checkpoint(file: &str, reason: impl Into<String>) -> Self {
        Error::Checkpoint {
            file: file.to_owned(),
            reason: reason.into(),
        }
    }

    pub(crate) fn tensor(file: &str, tensor: &str, reason: impl Into<String>) -> Self {
        Error::TensorHeader {
            file: file.to_owned(),
            tensor: tensor.to_owned(),
            reason: reason.into(),
        }
    }

    pub(crate) fn param(name: &str, reason: impl Into<String>) -> Self {
        Error::InvalidParam {
            name: name.to_owned(),
            reason: reason.into(),
        }
    }

    /// The reason of a parameter error (the whole message otherwise), for wrapping.
    pub(crate) fn detail(&self) -> String {
        match self {
            Error::InvalidParam { reason, .. } => reason.clone(),
            other => other.to_string(),
        }
    }
}
