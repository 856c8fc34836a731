//! Properties that must hold for every method and pool, checked on random in-memory models:
//! chunking and thread count never change a bit, zero deltas give back the base, and what the
//! writer writes the reader reads back.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use proptest::prelude::*;
use weightweave_core::dtype::{encode, DType};
use weightweave_core::{
    run_views, Job, Mode, ModelView, OutputOptions, Param, Params, Result, Sink, TensorRef,
};

struct VecSink(Vec<Mutex<Vec<u8>>>);

impl Sink for VecSink {
    fn write(&self, tensor: usize, offset: usize, data: &[u8]) -> Result<()> {
        let mut v = self.0[tensor].lock().unwrap();
        if v.len() < offset + data.len() {
            v.resize(offset + data.len(), 0);
        }
        v[offset..offset + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// Owned tensors: name -> (dtype, shape, bytes).
type Owned = BTreeMap<String, (DType, Vec<usize>, Vec<u8>)>;

fn view<'a>(label: &str, m: &'a Owned) -> ModelView<'a> {
    ModelView {
        label: label.to_owned(),
        tensors: m
            .iter()
            .map(|(n, (d, s, b))| {
                let r = TensorRef {
                    delta: None,
                    scale: None,
                    dtype: *d,
                    shape: s,
                    data: b,
                    file: "mem",
                };
                (n.clone(), r)
            })
            .collect(),
        maps: Vec::new(),
    }
}

fn model(values: &[Vec<f32>]) -> Owned {
    let shapes: [(&str, Vec<usize>, DType); 4] = [
        ("a", vec![values[0].len() / 4, 4], DType::F32),
        ("b", vec![values[1].len()], DType::BF16),
        ("c", vec![], DType::F16),
        ("d", vec![values[3].len()], DType::F32),
    ];
    let mut out = Owned::new();
    for ((name, shape, dt), v) in shapes.into_iter().zip(values) {
        let mut bytes = vec![0u8; v.len() * dt.size()];
        encode(dt, v, &mut bytes);
        out.insert(name.to_owned(), (dt, shape, bytes));
    }
    out.insert("ids".into(), (DType::I64, vec![2], vec![7u8; 16]));
    out
}

fn run(base: &Owned, models: &[Owned], job: &Job) -> Vec<Vec<u8>> {
    let bv = view("base", base);
    let mvs: Vec<ModelView> = models
        .iter()
        .enumerate()
        .map(|(i, m)| view(&format!("m{i}"), m))
        .collect();
    let sink = VecSink((0..base.len()).map(|_| Mutex::new(Vec::new())).collect());
    run_views(
        &bv,
        &mvs,
        job,
        &BTreeMap::new(),
        &sink,
        &|_, _, _| {},
        &AtomicBool::new(false),
    )
    .unwrap();
    sink.0
        .into_iter()
        .map(|m| m.into_inner().unwrap())
        .collect()
}

fn job(method: &str, mode: Mode, threads: usize, chunk: usize) -> Job {
    let mut params = Params::new();
    if method == "breadcrumbs" {
        params.insert("gamma".into(), Param::Num(0.1));
        params.insert("density".into(), Param::Num(0.4));
    }
    Job {
        params,
        seed: 42,
        threads: Some(threads),
        chunk_size: Some(chunk),
        ..Job::new(method, mode)
    }
}

const METHODS: [&str; 7] = [
    "task_arithmetic",
    "magmax",
    "dare",
    "dare_ties",
    "ties",
    "breadcrumbs",
    "pcb",
];

fn modes() -> Vec<Mode> {
    let mut v = vec![Mode::Merge { lam: None }];
    for pool in ["mean", "random", "magmax"] {
        for include_deltas in [true, false] {
            v.push(Mode::Weave {
                lambdas: Some(vec![0.2, 0.7, 1.3]),
                pool: pool.into(),
                include_deltas,
            });
        }
    }
    v
}

fn values(len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-2.0f32..2.0, len)
}

fn models_strategy() -> impl Strategy<Value = (Vec<Vec<f32>>, Vec<Vec<Vec<f32>>>)> {
    (1usize..12, 1usize..40, 1usize..4).prop_flat_map(|(rows, n1, tasks)| {
        let lens = vec![rows * 4, n1, 1, 3];
        let one = move |lens: Vec<usize>| lens.into_iter().map(values).collect::<Vec<_>>();
        (one(lens.clone()), prop::collection::vec(one(lens), tasks))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn chunking_and_threads_do_not_change_output((b, ms) in models_strategy(), chunk in 1usize..50) {
        let base = model(&b);
        let models: Vec<Owned> = ms.iter().map(|m| model(m)).collect();
        for method in METHODS {
            for mode in modes() {
                let reference = run(&base, &models, &job(method, mode.clone(), 1, 1 << 20));
                let other = run(&base, &models, &job(method, mode.clone(), 2, chunk));
                prop_assert_eq!(&reference, &other, "{} {:?}", method, mode);
            }
        }
    }

    #[test]
    fn zero_deltas_give_back_the_base((b, ms) in models_strategy()) {
        let base = model(&b);
        let models: Vec<Owned> = ms.iter().map(|_| base.clone()).collect();
        let expected: Vec<Vec<u8>> = base.values().map(|(_, _, bytes)| bytes.clone()).collect();
        for method in METHODS {
            for mode in modes() {
                prop_assert_eq!(&run(&base, &models, &job(method, mode.clone(), 2, 7)), &expected, "{} {:?}", method, mode);
            }
        }
    }
}

#[test]
fn written_files_read_back() {
    use weightweave_core::{prepare_files, Checkpoint};
    let dir = tempfile::tempdir().unwrap();
    // A base written by hand in safetensors layout, then merged to a sharded directory.
    let base = model(&[vec![0.5; 8], vec![1.0; 5], vec![2.0], vec![0.25; 3]]);
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (n, (d, s, b)) in &base {
        header.insert(n.clone(), serde_json::json!({"dtype": d.name(), "shape": s, "data_offsets": [data.len(), data.len() + b.len()]}));
        data.extend_from_slice(b);
    }
    let text = serde_json::to_vec(&header).unwrap();
    let mut file = (text.len() as u64).to_le_bytes().to_vec();
    file.extend(text);
    file.extend(data);
    let bp = dir.path().join("base.safetensors");
    std::fs::write(&bp, file).unwrap();
    let out = dir.path().join("out");
    let j = job(
        "ties",
        Mode::Weave {
            lambdas: None,
            pool: "mean".into(),
            include_deltas: true,
        },
        2,
        3,
    );
    let report = prepare_files(
        &bp,
        &[bp.clone(), bp.clone()],
        &out,
        &OutputOptions {
            shard_size: Some(20),
            overwrite: false,
        },
        &j,
        &|_, _, _| {},
        &AtomicBool::new(false),
    )
    .and_then(|p| p.publish())
    .unwrap();
    assert!(report.outputs.len() > 2);
    let back = Checkpoint::open(&out).unwrap();
    let v = back.view();
    assert_eq!(v.tensors.len(), base.len());
    for (n, (d, s, b)) in &base {
        let t = &v.tensors[n];
        assert_eq!(
            (t.dtype, t.shape.to_vec(), t.data.to_vec()),
            (*d, s.clone(), b.clone()),
            "{n}"
        );
    }
    assert!(back.metadata()["weightweave.recipe"].contains("\"ties\""));
}

/// Progress names its pass: statistics passes (1, 2, ...) come first, then the output (0),
/// and bytes never go backwards.
#[test]
fn progress_reports_each_pass() {
    let vals: Vec<Vec<f32>> = vec![
        (0..64).map(|i| i as f32 * 0.1).collect(),
        (0..9).map(|i| i as f32).collect(),
        vec![1.0],
        (0..5).map(|i| -(i as f32)).collect(),
    ];
    let base = model(&vals);
    let models: Vec<Owned> = (1..3)
        .map(|k| {
            model(
                &vals
                    .iter()
                    .map(|v| v.iter().map(|x| x + k as f32 * 0.3).collect())
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    for (method, passes) in [("ties", 1), ("pcb", 2), ("task_arithmetic", 0)] {
        let seen = Mutex::new(Vec::new());
        let bv = view("base", &base);
        let mvs: Vec<ModelView> = models.iter().map(|m| view("m", m)).collect();
        let sink = VecSink((0..base.len()).map(|_| Mutex::new(Vec::new())).collect());
        let j = job(method, Mode::Merge { lam: None }, 1, 8);
        run_views(
            &bv,
            &mvs,
            &j,
            &BTreeMap::new(),
            &sink,
            &|d, t, s| seen.lock().unwrap().push((d, t, s)),
            &AtomicBool::new(false),
        )
        .unwrap();
        let seen = seen.into_inner().unwrap();
        let stages: Vec<u32> = seen.iter().map(|x| x.2).collect();
        let first_output = stages.iter().position(|&s| s == 0).unwrap();
        assert!(
            stages[first_output..].iter().all(|&s| s == 0),
            "{method}: {stages:?}"
        );
        assert_eq!(
            stages[..first_output].iter().max().copied().unwrap_or(0),
            passes,
            "{method}"
        );
        assert!(
            stages[..first_output].windows(2).all(|w| w[0] <= w[1]),
            "{method}"
        );
        assert!(
            seen.windows(2).all(|w| w[0].0 <= w[1].0),
            "{method}: bytes go backwards"
        );
    }
}
