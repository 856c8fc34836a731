//! A restricted unpickler for PyTorch state dicts: it understands exactly the opcodes and the
//! handful of globals a `torch.save(state_dict)` pickle uses (ordered dicts, tensor and parameter
//! rebuilds, typed storages) and refuses everything else. Nothing is ever called: "calls" are
//! recognised by name and turned into data, so a pickle that tries to run code is an error, not
//! an exploit.

use crate::dtype::DType;

/// What the unpickler builds. Only what a state dict needs.
#[derive(Clone, Debug)]
pub enum Value {
    None,
    /// A value a state dict may carry (in its `_metadata`) but no tensor needs: a bool, a
    /// float, bytes.
    Opaque,
    Int(i64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A global the allowlist knows, by (module, name).
    Global(String, String),
    /// A storage reference from a persistent id: its dtype and its key in the archive.
    Storage {
        dtype: DType,
        key: String,
    },
    Tensor(Tensor),
    Mark,
}

/// A rebuilt tensor: a view of `numel` elements from `offset` in a storage.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub dtype: DType,
    pub key: String,
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

const STORAGES: [(&str, DType); 12] = [
    ("FloatStorage", DType::F32),
    ("HalfStorage", DType::F16),
    ("BFloat16Storage", DType::BF16),
    ("DoubleStorage", DType::F64),
    ("LongStorage", DType::I64),
    ("IntStorage", DType::I32),
    ("ShortStorage", DType::I16),
    ("CharStorage", DType::I8),
    ("ByteStorage", DType::U8),
    ("BoolStorage", DType::Bool),
    ("Float8_e4m3fnStorage", DType::F8E4M3),
    ("Float8_e5m2Storage", DType::F8E5M2),
];

fn allowed(module: &str, name: &str) -> bool {
    matches!(
        (module, name),
        ("collections", "OrderedDict")
            | ("torch._utils", "_rebuild_tensor_v2")
            | ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state")
    ) || (module == "torch" && STORAGES.iter().any(|(n, _)| *n == name))
}

struct Vm<'a> {
    data: &'a [u8],
    at: usize,
    stack: Vec<Value>,
    memo: std::collections::HashMap<u32, Value>,
}

type R<T> = std::result::Result<T, String>;

impl<'a> Vm<'a> {
    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or("the pickle ends in the middle of an instruction")?;
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn line(&mut self) -> R<String> {
        let rest = &self.data[self.at..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated GLOBAL")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "GLOBAL is not UTF-8")?;
        self.at += n + 1;
        Ok(s.to_owned())
    }

    fn pop(&mut self) -> R<Value> {
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    /// Everything above the topmost mark (which is removed).
    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("no MARK on the stack")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn text(&mut self, n: usize) -> R<Value> {
        let b = self.take(n)?;
        Ok(Value::Str(
            std::str::from_utf8(b)
                .map_err(|_| "string is not UTF-8")?
                .to_owned(),
        ))
    }

    fn global(&mut self, module: String, name: String) -> R<()> {
        if !allowed(&module, &name) {
            return Err(format!(
                "it refers to '{module}.{name}', which a state dict never needs; refusing to load it (a pickle can run code)"
            ));
        }
        self.stack.push(Value::Global(module, name));
        Ok(())
    }

    fn set_items(target: &mut Value, items: Vec<Value>) -> R<()> {
        let Value::Dict(d) = target else {
            return Err("SETITEMS on something that is not a dict".into());
        };
        if items.len() % 2 != 0 {
            return Err("odd number of items for a dict".into());
        }
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn run(&mut self) -> R<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.u64()?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = usize::try_from(self.u64()?).map_err(|_| "string too long")?;
                    let v = self.text(n)?;
                    self.stack.push(v);
                }
                b'B' | b'C' => {
                    let n = if op == b'B' { self.u32()? as usize } else { self.u8()? as usize };
                    self.take(n)?;
                    self.stack.push(Value::Opaque);
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"));
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes"));
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err("integer too large".into());
                    }
                    let neg = b.last().is_some_and(|&x| x & 0x80 != 0);
                    let mut buf = [if neg { 0xFF } else { 0 }; 8];
                    buf[..n].copy_from_slice(b);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Opaque);
                }
                b'N' => self.stack.push(Value::None),
                0x88 | 0x89 => self.stack.push(Value::Opaque),
                b'q' | b'r' | 0x94 => {
                    let key = match op {
                        b'q' => self.u8()? as u32,
                        b'r' => self.u32()?,
                        _ => self.memo.len() as u32,
                    };
                    let top = self.stack.last().ok_or("memo of an empty stack")?;
                    // Sharing large containers is never needed by a state dict, and copying
                    // them could blow memory up quadratically: they are not memoized (a later
                    // reference to one is then an error).
                    let big = matches!(top, Value::List(v) | Value::Tuple(v) if v.len() > 64)
                        || matches!(top, Value::Dict(d) if d.len() > 64);
                    if !big {
                        let top = top.clone();
                        self.memo.insert(key, top);
                    }
                }
                b'h' | b'j' => {
                    let key = if op == b'h' { self.u8()? as u32 } else { self.u32()? };
                    let v = self.memo.get(&key).ok_or("unknown memo key")?.clone();
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.global(m, n)?,
                        _ => return Err("STACK_GLOBAL needs two strings".into()),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(storage(pid)?);
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    self.stack.push(reduce(f, args)?);
                }
                b'b' => {
                    // BUILD: state for the object below (an OrderedDict's `_metadata`): ignored.
                    self.pop()?;
                    if self.stack.is_empty() {
                        return Err("BUILD on an empty stack".into());
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.stack.last_mut().ok_or("SETITEM on an empty stack")?;
                    Self::set_items(d, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let d = self.stack.last_mut().ok_or("SETITEMS on an empty stack")?;
                    Self::set_items(d, items)?;
                }
                b'a' | b'e' => {
                    let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                    match self.stack.last_mut() {
                        Some(Value::List(l)) => l.extend(items),
                        _ => return Err("APPEND on something that is not a list".into()),
                    }
                }
                other => {
                    return Err(format!(
                        "it uses pickle opcode 0x{other:02x}, which a state dict never needs; refusing to load it"
                    ))
                }
            }
        }
    }
}

fn int(v: &Value) -> R<u64> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as u64),
        _ => Err("expected a non-negative integer".into()),
    }
}

fn ints(v: &Value) -> R<Vec<u64>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items.iter().map(int).collect(),
        _ => Err("expected a tuple of integers".into()),
    }
}

/// ('storage', torch.XStorage, key, location, numel) → a storage reference.
fn storage(pid: Value) -> R<Value> {
    let Value::Tuple(t) = pid else {
        return Err("a persistent id that is not a tuple".into());
    };
    match t.as_slice() {
        [Value::Str(kind), Value::Global(m, n), Value::Str(key), _, _]
            if kind == "storage" && m == "torch" =>
        {
            let dtype = STORAGES
                .iter()
                .find(|(s, _)| s == n)
                .map(|(_, d)| *d)
                .ok_or_else(|| format!("unsupported storage type torch.{n}"))?;
            Ok(Value::Storage {
                dtype,
                key: key.clone(),
            })
        }
        _ => Err("a persistent id that is not a tensor storage".into()),
    }
}

/// A "call" of an allowlisted global, turned into data.
fn reduce(f: Value, args: Value) -> R<Value> {
    let Value::Global(module, name) = f else {
        return Err("REDUCE of something that is not an allowed global".into());
    };
    let Value::Tuple(args) = args else {
        return Err("REDUCE arguments are not a tuple".into());
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") => Ok(Value::Dict(Vec::new())),
        ("torch._utils", "_rebuild_tensor_v2") => match args.as_slice() {
            [Value::Storage { dtype, key }, offset, shape, stride, ..] => {
                Ok(Value::Tensor(Tensor {
                    dtype: *dtype,
                    key: key.clone(),
                    offset: int(offset)?,
                    shape: ints(shape)?,
                    stride: ints(stride)?,
                }))
            }
            _ => Err("_rebuild_tensor_v2 with unexpected arguments".into()),
        },
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            match args.into_iter().next() {
                Some(t @ Value::Tensor(_)) => Ok(t),
                _ => Err("_rebuild_parameter of something that is not a tensor".into()),
            }
        }
        _ => Err(format!("calls '{module}.{name}'")),
    }
}

/// Unpickles `data` into a value, or says why it will not.
pub fn load(data: &[u8]) -> R<Value> {
    let mut vm = Vm {
        data,
        at: 0,
        stack: Vec::new(),
        memo: Default::default(),
    };
    vm.run()
}
