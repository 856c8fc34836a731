//! A restricted unpickler for PyTorch checkpoints: it understands the opcodes and the handful of
//! globals a `torch.save(state_dict)` pickle uses (ordered dicts, sets, tensor and parameter
//! rebuilds, typed storages) and turns them into data. Nothing is ever called or constructed:
//! any other global becomes an inert marker ([`Value::Foreign`]) and what a pickle makes from one
//! an inert [`Value::Object`] that only records its class, whether a call made it, and the state
//! BUILD gave it. So a whole pickled `nn.Module` (`torch.save(model)`) can be walked for its
//! tensors (`pytorch.rs`) without its classes, and a pickle that tries to run code never does:
//! where its value was made by a call, the reader refuses it, naming the callable.

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
    Global(&'static str, &'static str),
    /// Any other global, as "module.name": an inert marker, never imported nor called.
    Foreign(Box<str>),
    /// What a pickle makes from a foreign global: nothing is constructed (see [`Object`]).
    Object(Box<Object>),
    /// A storage reference from a persistent id: its dtype and its key in the archive.
    Storage {
        dtype: DType,
        key: String,
    },
    /// Boxed: values are many and most are small.
    Tensor(Box<Tensor>),
    Mark,
}

/// An instance a pickle describes, as data: `class` (the foreign global, "module.name"), `called`
/// when it is the result of calling that global (REDUCE: only running code could tell what it
/// is) rather than an instance of that class made without running any of its code (NEWOBJ, or
/// copyreg's reconstructor, as `torch.save(model)` pickles modules), and the `state` BUILD gave
/// it (a module's `__dict__`).
#[derive(Clone, Debug)]
pub struct Object {
    pub class: Box<str>,
    pub called: bool,
    pub state: Option<Value>,
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

const CALLS: [(&str, &str); 7] = [
    ("collections", "OrderedDict"),
    // A module's `_non_persistent_buffers_set` (protocol 2 pickles a set as a call on a list).
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("__builtin__", "set"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
];

/// The allowlisted global (module, name), or None.
fn allowed(module: &str, name: &str) -> Option<(&'static str, &'static str)> {
    CALLS
        .iter()
        .find(|(m, n)| *m == module && *n == name)
        .copied()
        .or_else(|| {
            let s = STORAGES
                .iter()
                .find(|(n, _)| module == "torch" && *n == name)?;
            Some(("torch", s.0))
        })
}

/// Nesting a state dict never needs (a `_metadata` dict of dicts inside the top dict is 3
/// levels). It bounds the recursion of cloning and dropping a value, so no pickle can overflow
/// the stack however deeply it nests.
pub const MAX_DEPTH: u32 = 64;
/// Marks open at once: `torch.save` nests two or three.
pub const MAX_MARKS: usize = 1024;
/// Values on the stack at once: pickles batch dict items and list elements by 1 000, so a
/// state dict's stack stays in the low thousands whatever its size.
pub const MAX_STACK: usize = 1 << 16;
/// Values made in all may not exceed the pickle's length plus this: each opcode byte makes at
/// most one value, and memo fetches, which copy, are charged their whole size, so a kilobyte
/// of memo references cannot build 64^5 values.
pub const EXTRA_VALUES: u64 = 1 << 16;

/// A value with what bounds it: its nesting depth and how many values it holds (itself
/// included).
#[derive(Clone)]
struct Item {
    v: Value,
    depth: u32,
    size: u64,
}

struct Vm<'a> {
    data: &'a [u8],
    at: usize,
    stack: Vec<Item>,
    marks: usize,
    /// Indexed by memo key (picklers number them 0, 1, 2, ...): None for a key never set,
    /// Some(None) for a value too large to share.
    memo: Vec<Option<Option<Item>>>,
    /// Distinct keys set: the next MEMOIZE key, as Python's `len(memo)`.
    memo_len: usize,
    /// Values made so far: each new one, and every value a memo fetch copies.
    made: u64,
    budget: u64,
}

type R<T> = std::result::Result<T, String>;

/// The depth and size of a container holding `items`, or an error past [`MAX_DEPTH`].
fn measure<'i>(items: impl Iterator<Item = &'i Item>, depth: u32, size: u64) -> R<(u32, u64)> {
    let (mut d, mut n) = (depth, size);
    for it in items {
        d = d.max(it.depth + 1);
        n = n.saturating_add(it.size);
    }
    if d > MAX_DEPTH {
        return Err(format!(
            "it nests values more than {MAX_DEPTH} levels deep: not a state dict"
        ));
    }
    Ok((d, n))
}

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

    fn charge(&mut self, n: u64) -> R<()> {
        self.made = self.made.saturating_add(n);
        if self.made > self.budget {
            return Err(format!(
                "it builds more than {} values from {} bytes (memo references copied over and over): not a state dict",
                self.budget,
                self.data.len()
            ));
        }
        Ok(())
    }

    /// Pushes a new value that holds no others.
    fn push(&mut self, v: Value) -> R<()> {
        self.charge(1)?;
        self.push_item(Item {
            v,
            depth: 0,
            size: 1,
        })
    }

    fn push_item(&mut self, it: Item) -> R<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(format!(
                "more than {MAX_STACK} values on its stack at once: not a state dict"
            ));
        }
        self.stack.push(it);
        Ok(())
    }

    /// Pushes a new tuple of `items`.
    fn push_tuple(&mut self, items: Vec<Item>) -> R<()> {
        self.charge(1)?;
        let (depth, size) = measure(items.iter(), 1, 1)?;
        let v = Value::Tuple(items.into_iter().map(|i| i.v).collect());
        self.push_item(Item { v, depth, size })
    }

    fn pop(&mut self) -> R<Item> {
        let it = self.stack.pop().ok_or("stack underflow")?;
        if matches!(it.v, Value::Mark) {
            self.marks -= 1;
        }
        Ok(it)
    }

    fn pop_value(&mut self) -> R<Value> {
        Ok(self.pop()?.v)
    }

    /// Everything above the topmost mark (which is removed).
    fn pop_mark(&mut self) -> R<Vec<Item>> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v.v, Value::Mark))
            .ok_or("no MARK on the stack")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        self.marks -= 1;
        Ok(items)
    }

    /// Adds `items` to the container on top of the stack: key/value pairs to a dict
    /// (`dict = true`), elements to a list.
    fn extend_top(&mut self, items: Vec<Item>, dict: bool) -> R<()> {
        if items.iter().any(|i| matches!(i.v, Value::Mark)) {
            return Err("a MARK stored in a container".into());
        }
        let top = self
            .stack
            .last_mut()
            .ok_or("SETITEMS/APPEND on an empty stack")?;
        let (depth, size) = measure(items.iter(), top.depth, top.size)?;
        match (&mut top.v, dict) {
            (Value::Dict(d), true) => {
                if !items.len().is_multiple_of(2) {
                    return Err("odd number of items for a dict".into());
                }
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k.v, v.v));
                }
            }
            (Value::List(l), false) => l.extend(items.into_iter().map(|i| i.v)),
            (_, true) => return Err("SETITEMS on something that is not a dict".into()),
            (_, false) => return Err("APPEND on something that is not a list".into()),
        }
        top.depth = depth;
        top.size = size;
        Ok(())
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
        match allowed(&module, &name) {
            Some((m, n)) => self.push(Value::Global(m, n)),
            None => self.push(Value::Foreign(format!("{module}.{name}").into())),
        }
    }

    /// NEWOBJ / NEWOBJ_EX: `cls.__new__(cls, *args)`, recorded, not run.
    fn new_object(&mut self, cls: Value) -> R<()> {
        match cls {
            Value::Global("collections", "OrderedDict") => self.push(Value::Dict(Vec::new())),
            Value::Foreign(class) => self.push(Value::Object(Box::new(Object {
                class,
                called: false,
                state: None,
            }))),
            _ => Err("NEWOBJ of something that is not a class".into()),
        }
    }

    /// BUILD: the state of the object below. An [`Object`] keeps it (it is what a module's
    /// tensors are found in); for anything else (an ordered dict's `_metadata`) it is dropped.
    fn build(&mut self) -> R<()> {
        let state = self.pop()?;
        let top = self.stack.last_mut().ok_or("BUILD on an empty stack")?;
        if let Value::Object(o) = &mut top.v {
            let (depth, size) = measure(std::iter::once(&state), top.depth, top.size)?;
            o.state = Some(state.v);
            (top.depth, top.size) = (depth, size);
        } else if matches!(top.v, Value::Mark) {
            return Err("BUILD on a MARK".into());
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
                b'.' => return self.pop_value(),
                b'(' => {
                    if self.marks >= MAX_MARKS {
                        return Err(format!(
                            "more than {MAX_MARKS} MARKs open at once: not a state dict"
                        ));
                    }
                    self.push(Value::Mark)?;
                    self.marks += 1;
                }
                b'}' => self.push(Value::Dict(Vec::new()))?,
                b']' => self.push(Value::List(Vec::new()))?,
                b')' => self.push(Value::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_tuple(items)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    if items.iter().any(|i| matches!(i.v, Value::Mark)) {
                        return Err("a MARK inside a tuple".into());
                    }
                    self.push_tuple(items)?;
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.text(n)?;
                    self.push(v)?;
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.text(n)?;
                    self.push(v)?;
                }
                0x8d => {
                    let n = usize::try_from(self.u64()?).map_err(|_| "string too long")?;
                    let v = self.text(n)?;
                    self.push(v)?;
                }
                b'B' | b'C' => {
                    let n = if op == b'B' { self.u32()? as usize } else { self.u8()? as usize };
                    self.take(n)?;
                    self.push(Value::Opaque)?;
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"));
                    self.push(Value::Int(v as i64))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes"));
                    self.push(Value::Int(v as i64))?;
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
                    self.push(Value::Int(i64::from_le_bytes(buf)))?;
                }
                b'G' => {
                    self.take(8)?;
                    self.push(Value::Opaque)?;
                }
                b'N' => self.push(Value::None)?,
                0x88 | 0x89 => self.push(Value::Opaque)?,
                b'q' | b'r' | 0x94 => {
                    let key = match op {
                        b'q' => self.u8()? as usize,
                        b'r' => self.u32()? as usize,
                        _ => self.memo_len,
                    };
                    // Keys run 0, 1, 2, ... and torch.save memoizes about one object per 13
                    // bytes of pickle: a key beyond this is not a state dict's.
                    if key > self.data.len() / 4 + 4096 {
                        return Err(format!(
                            "memo key {key} is beyond what a pickle of {} bytes uses",
                            self.data.len()
                        ));
                    }
                    let top = self.stack.last().ok_or("memo of an empty stack")?;
                    if matches!(top.v, Value::Mark) {
                        return Err("memo of a MARK".into());
                    }
                    // Sharing large containers is never needed by a state dict, and copying
                    // them could blow memory up quadratically: they are not memoized (a later
                    // reference to one is then an error). Memoizing copies too: charged like a
                    // fetch, so MEMOIZE repeated over a 64-value tuple cannot build gigabytes.
                    let entry = if top.size <= 64 {
                        let (top, size) = (top.clone(), top.size);
                        self.charge(size)?;
                        Some(top)
                    } else {
                        None
                    };
                    if self.memo.len() <= key {
                        self.memo.resize_with(key + 1, || None);
                    }
                    if self.memo[key].replace(entry).is_none() {
                        self.memo_len += 1;
                    }
                }
                b'h' | b'j' => {
                    let key = if op == b'h' { self.u8()? as usize } else { self.u32()? as usize };
                    let item = match self.memo.get(key) {
                        Some(Some(Some(item))) => item,
                        Some(Some(None)) => {
                            return Err("a memo reference to a large shared value, which a state dict never makes".into())
                        }
                        _ => return Err("unknown memo key".into()),
                    };
                    // A copy costs what it holds: charged before it is made.
                    let (v, size) = (item.clone(), item.size);
                    self.charge(size)?;
                    self.push_item(v)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    let name = self.pop_value()?;
                    let module = self.pop_value()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.global(m, n)?,
                        _ => return Err("STACK_GLOBAL needs two strings".into()),
                    }
                }
                b'Q' => {
                    let pid = self.pop_value()?;
                    self.push(storage(pid)?)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop_value()?;
                    // The result holds at most what the arguments held (a set's list): it
                    // keeps their depth and size, so no call can hide nesting from the bounds.
                    let (depth, size) = (args.depth, args.size);
                    let v = reduce(f, args.v)?;
                    self.charge(1)?;
                    self.push_item(Item { v, depth, size })?;
                }
                b'b' => self.build()?,
                0x81 => {
                    self.pop()?; // NEWOBJ: the arguments (unused: nothing is constructed)
                    let cls = self.pop_value()?;
                    self.new_object(cls)?;
                }
                0x92 => {
                    self.pop()?; // NEWOBJ_EX: keyword and positional arguments
                    self.pop()?;
                    let cls = self.pop_value()?;
                    self.new_object(cls)?;
                }
                0x8f => self.push(Value::List(Vec::new()))?, // EMPTY_SET: a set as a list
                0x90 => {
                    let items = self.pop_mark()?; // ADDITEMS
                    self.extend_top(items, false)?;
                }
                0x91 => {
                    let items = self.pop_mark()?; // FROZENSET
                    self.charge(1)?;
                    let (depth, size) = measure(items.iter(), 1, 1)?;
                    let v = Value::List(items.into_iter().map(|i| i.v).collect());
                    self.push_item(Item { v, depth, size })?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.extend_top(vec![k, v], true)?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.extend_top(items, true)?;
                }
                b'a' => {
                    let item = self.pop()?;
                    self.extend_top(vec![item], false)?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_top(items, false)?;
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
            if kind == "storage" && *m == "torch" =>
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

/// A "call" of an allowlisted global, turned into data; of a foreign one, an inert object that
/// records it (copyreg's reconstructor makes an instance without running its class's code).
fn reduce(f: Value, args: Value) -> R<Value> {
    let Value::Tuple(args) = args else {
        return Err("REDUCE arguments are not a tuple".into());
    };
    let (module, name) = match f {
        Value::Global(module, name) => (module, name),
        Value::Foreign(callable) => {
            let reconstructed = match (&*callable, args.first()) {
                ("copyreg._reconstructor", Some(Value::Foreign(class))) => Some(class.clone()),
                _ => None,
            };
            let called = reconstructed.is_none();
            let class = reconstructed.unwrap_or(callable);
            return Ok(Value::Object(Box::new(Object {
                class,
                called,
                state: None,
            })));
        }
        _ => return Err("REDUCE of something that is not a global".into()),
    };
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Value::Dict(Vec::new())),
        ("builtins" | "__builtin__", "set" | "frozenset") => match args.into_iter().next() {
            None => Ok(Value::List(Vec::new())),
            Some(Value::List(l) | Value::Tuple(l)) => Ok(Value::List(l)),
            Some(_) => Err("a set made from something that is not a list".into()),
        },
        ("torch._utils", "_rebuild_tensor_v2") => match args.as_slice() {
            [Value::Storage { dtype, key }, offset, shape, stride, ..] => {
                Ok(Value::Tensor(Box::new(Tensor {
                    dtype: *dtype,
                    key: key.clone(),
                    offset: int(offset)?,
                    shape: ints(shape)?,
                    stride: ints(stride)?,
                })))
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
        marks: 0,
        memo: Vec::new(),
        memo_len: 0,
        made: 0,
        budget: (data.len() as u64).saturating_add(EXTRA_VALUES),
    };
    vm.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        // (((...))) 100 000 levels: each TUPLE1 wraps the one before.
        let mut p = b"\x80\x02)".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, 100_000));
        p.push(b'.');
        assert!(load(&p).unwrap_err().contains("levels deep"));
        // Within the limit it loads.
        let mut p = b"\x80\x02)".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, MAX_DEPTH as usize - 1));
        p.push(b'.');
        assert!(load(&p).is_ok());
        // Lists nested through APPEND count too.
        let mut p = b"\x80\x02]".to_vec();
        for _ in 0..200 {
            p.extend(b"]");
        }
        p.extend(std::iter::repeat_n(b'a', 200));
        p.push(b'.');
        assert!(load(&p).unwrap_err().contains("levels deep"));
    }

    #[test]
    fn memo_copies_are_charged() {
        // 5 levels of 64 references to the memo: 64^5 values from about 1 KB.
        let mut p = b"\x80\x02N\x94".to_vec();
        for level in 0..5u8 {
            p.push(b'(');
            for _ in 0..64 {
                p.extend([b'h', level]);
            }
            p.extend(b"t\x94");
        }
        p.push(b'.');
        let e = load(&p).unwrap_err();
        assert!(e.contains("values") || e.contains("memo"), "{e}");
        // The largest memoizable value (64 values) fetched 10 000 times: 640 000 copies from
        // 20 KB, past the budget of the pickle's length + 65 536.
        let mut p = b"\x80\x02(".to_vec();
        p.extend(std::iter::repeat_n(b'N', 63));
        p.extend(b"t\x94]");
        p.extend(std::iter::repeat_n(*b"h\x00a", 10_000).flatten());
        p.push(b'.');
        assert!(load(&p).unwrap_err().contains("builds more than"));
        // Memoizing the same tuple over and over copies it as often.
        let mut p = b"\x80\x02(".to_vec();
        p.extend(std::iter::repeat_n(b'N', 63));
        p.push(b't');
        p.extend(std::iter::repeat_n(0x94u8, 10_000));
        p.push(b'.');
        assert!(load(&p).unwrap_err().contains("builds more than"));
    }

    #[test]
    fn marks_are_bounded() {
        let mut p = b"\x80\x02".to_vec();
        p.extend(std::iter::repeat_n(b'(', 10_000));
        p.push(b'.');
        assert!(load(&p).unwrap_err().contains("MARK"));
        let mut p = b"\x80\x02".to_vec();
        p.extend(std::iter::repeat_n(b'N', 100_000));
        p.push(b'.');
        assert!(load(&p).unwrap_err().contains("stack"));
        assert!(std::mem::size_of::<Value>() <= 40);
    }

    #[test]
    fn foreign_objects_are_data_and_hold_their_state() {
        // GLOBAL m.C, (), NEWOBJ, {'a': 1}, BUILD: an object of class m.C with that state.
        let p = b"\x80\x02cm\nC\n)\x81}X\x01\x00\x00\x00aK\x01sb.";
        let Value::Object(o) = load(p).unwrap() else {
            panic!("an object")
        };
        assert_eq!((&*o.class, o.called), ("m.C", false));
        assert!(matches!(o.state, Some(Value::Dict(ref d)) if d.len() == 1));
        // GLOBAL os.system, ('x',), REDUCE: recorded as a call, never made.
        let p = b"\x80\x02cos\nsystem\nX\x01\x00\x00\x00x\x85R.";
        let Value::Object(o) = load(p).unwrap() else {
            panic!("an object")
        };
        assert_eq!((&*o.class, o.called), ("os.system", true));
        // A set (protocol 2: builtins.set called on a list) is a list.
        let p = b"\x80\x02cbuiltins\nset\n]X\x01\x00\x00\x00ba\x85R.";
        assert!(matches!(load(p).unwrap(), Value::List(ref l) if l.len() == 1));
    }

    #[test]
    fn calls_and_builds_keep_the_depth_bound() {
        // Nesting passed through calls still counts: set((set((... [] ...),)),), 100 deep.
        let mut p = b"\x80\x02".to_vec();
        p.extend(b"cbuiltins\nset\n".repeat(100));
        p.push(b']');
        p.extend(b"\x85R".repeat(100)); // (x,), then set((x,)): a list holding x
        p.push(b'.');
        assert!(load(&p).unwrap_err().contains("levels deep"));
        // A state BUILT into an object counts too: 100 objects, each BUILT into the one below.
        let mut p = b"\x80\x02".to_vec();
        p.extend(b"cm\nC\n)\x81".repeat(100));
        p.push(b'N');
        p.extend(b"b".repeat(100));
        p.push(b'.');
        assert!(load(&p).unwrap_err().contains("levels deep"));
    }

    #[test]
    fn small_shared_values_still_load() {
        // A state dict's memo use: a global fetched again for a second call.
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00bh\x00u.";
        let Value::Dict(d) = load(p).unwrap() else {
            panic!("a dict")
        };
        assert_eq!(d.len(), 2);
    }
}
