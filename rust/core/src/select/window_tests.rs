//! The windowed select against sorting: kept keys, counted keys and per-chunk counts.

use super::*;
use proptest::prelude::*;

/// Windows placed by hand: `bounds` and `caps` per request.
fn by_hand(requests: Vec<Request>, bounds: Vec<(u32, u32)>, caps: Vec<usize>) -> Windows {
    Windows {
        guess: vec![0; requests.len()],
        dense: vec![false; requests.len()],
        requests,
        bounds,
        caps,
        viable: true,
        late: Vec::new(),
        total: 0,
        expected: Vec::new(),
    }
}

/// Windowed counts of `values` in chunks, merged, and their selected values.
fn select_windowed(w: &Windows, values: &[f32], chunk: usize) -> Option<Vec<f32>> {
    select_counting(w, values, chunk, Windowed::count)
}

/// [`select_windowed`], each chunk counted by `count` ([`Windowed::count_abs`]: of |values|).
fn select_counting(
    w: &Windows,
    values: &[f32],
    chunk: usize,
    count: fn(&mut Windowed, &Windows, usize, &[f32]),
) -> Option<Vec<f32>> {
    let mut acc = w.acc();
    for c in values.chunks(chunk) {
        let mut part = w.acc();
        count(&mut part, w, 0, c);
        acc = acc.merge(part);
    }
    acc.finish(w)
}

/// Values 1 + level · 2^-20: eight keys apart, so windows span few keys.
fn near_one(levels: &[u16]) -> Vec<f32> {
    levels
        .iter()
        .map(|&l| 1.0 + f32::from(l) * (1.0 / 1_048_576.0))
        .collect()
}

/// A 6σ window for `rank` of `values` (near 1: see [`near_one`]) from every `stride`-th value;
/// ends the sample left open are closed around the data so that a counted span fits (any
/// window is a valid one: a rank outside it declines). None if nothing is left of it.
fn window_near_one(values: &[f32], rank: u64, stride: usize, dense: bool) -> Option<Windows> {
    let mut sample: Vec<u32> = values.iter().step_by(stride).map(|&v| key(v)).collect();
    sample.sort_unstable();
    let mut w = Windows::from_sample(
        vec![Request { row: 0, rank }],
        &[sample.into()],
        values.len() as u64,
        6.0,
    );
    let (lo, hi) = w.bounds[0];
    w.bounds[0] = (
        lo.max(key(1.0) - 1),
        hi.min(key(1.0 + 3001.0 / 1_048_576.0)),
    );
    w.dense = vec![dense];
    (w.bounds[0].0 < w.bounds[0].1).then_some(w)
}

proptest! {
    /// Counting each key of a window selects what keeping the keys selects (ties
    /// included), for any chunking.
    #[test]
    fn dense_windows_select_the_same(levels in prop::collection::vec(0u16..3000, 1..2000), r in 0usize..2000, stride in 1usize..50, chunk in 1usize..100) {
        let values = near_one(&levels);
        let rank = (r % values.len()) as u64;
        let w = window_near_one(&values, rank, stride, true);
        prop_assume!(w.is_some());
        let w = w.unwrap();
        let mut sorted = values.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if let Some(v) = select_windowed(&w, &values, chunk) {
            prop_assert_eq!(v[0], sorted[rank as usize]);
        }
    }
}

proptest! {
    /// Counting the magnitudes of signed values selects what counting the values' |·| does,
    /// and the sorted magnitudes' value at the rank, with kept keys and counted keys alike.
    #[test]
    fn magnitudes_count_as_their_absolute_values(levels in prop::collection::vec(-3000i16..3000, 1..2000), r in 0usize..2000, stride in 1usize..50, chunk in 1usize..100, dense in any::<bool>()) {
        // ±(1 + |level| · 2^-20): magnitudes eight keys apart (a counted window's span stays
        // small), signs mixed.
        let values: Vec<f32> = levels
            .iter()
            .map(|&l| (1.0 + f32::from(l.unsigned_abs()) * (1.0 / 1_048_576.0)).copysign(f32::from(l) + 0.5))
            .collect();
        let abs: Vec<f32> = values.iter().map(|v| v.abs()).collect();
        let rank = (r % values.len()) as u64;
        let w = window_near_one(&abs, rank, stride, dense);
        prop_assume!(w.is_some());
        let w = w.unwrap();
        let got = select_counting(&w, &values, chunk, Windowed::count_abs);
        prop_assert_eq!(&got, &select_windowed(&w, &abs, chunk));
        let mut sorted = abs.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if let Some(v) = got {
            prop_assert_eq!(v[0].to_bits(), sorted[rank as usize].to_bits());
        }
    }
}

proptest! {
    /// Values below the row's floor left out and only counted (as PCB's scores leave out the
    /// elements their bound settles) select what counting every value selects, and the sorted
    /// values' value at the rank; with kept keys and counted keys alike, in any chunking.
    #[test]
    fn values_left_out_below_the_floor_count_the_same(levels in prop::collection::vec(0u16..3000, 1..2000), r in 0usize..2000, stride in 1usize..50, chunk in 1usize..100, dense in any::<bool>()) {
        let values = near_one(&levels);
        let rank = (r % values.len()) as u64;
        let w = window_near_one(&values, rank, stride, dense);
        prop_assume!(w.is_some());
        let w = w.unwrap();
        let floor = w.floors(1)[0];
        let mut acc = w.acc();
        let mut left_out = 0;
        for c in values.chunks(chunk) {
            let kept: Vec<f32> = c.iter().copied().filter(|&v| v >= floor).collect();
            let mut part = w.acc();
            part.count(&w, 0, &kept);
            part.count_below(&w, 0, (c.len() - kept.len()) as u64);
            // Another row's count leaves this one's alone.
            part.count_below(&w, 1, 7);
            left_out += c.len() - kept.len();
            acc = acc.merge(part);
        }
        let got = acc.finish(&w);
        prop_assert_eq!(&got, &select_windowed(&w, &values, chunk));
        let mut sorted = values.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if let Some(v) = got {
            prop_assert_eq!(v[0].to_bits(), sorted[rank as usize].to_bits());
            // The floor leaves some out where the rank is well above it.
            prop_assert!(left_out > 0 || sorted[0] >= floor);
        }
    }
}

#[test]
fn densified_windows_select_exactly() {
    // 100 000 values, a sample of 1 in 50: 6σ windows expect far more keys than the caps
    // a budget of 64 would give, so densify counts them instead.
    let levels: Vec<u16> = (0..100_000u32)
        .map(|i| ((i * 7919) % 3001) as u16)
        .collect();
    let values = near_one(&levels);
    let mut sample: Vec<u32> = values.iter().step_by(50).map(|&v| key(v)).collect();
    sample.sort_unstable();
    let mut sorted = values.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    for rank in [20_000u64, 50_000, 79_999] {
        let mut w = Windows::from_sample(
            vec![Request { row: 0, rank }],
            &[sample.clone().into()],
            100_000,
            6.0,
        );
        w.caps = vec![64];
        let w = w.densified();
        assert_eq!(w.dense, vec![true], "rank {rank}");
        assert!(w.viable);
        let got = select_windowed(&w, &values, 777);
        assert_eq!(got, Some(vec![sorted[rank as usize]]), "rank {rank}");
    }
}

proptest! {
    #[test]
    fn windowed_is_exact_or_declines(values in prop::collection::vec(-1e3f32..1e3, 1..2000), r in 0usize..2000, stride in 1usize..50, chunk in 1usize..100) {
        let rank = (r % values.len()) as u64;
        let mut sample: Vec<u32> = values.iter().step_by(stride).map(|&v| key(v)).collect();
        sample.sort_unstable();
        let w = Windows::from_sample(vec![Request { row: 0, rank }], &[sample.into()], values.len() as u64, 6.0);
        let mut acc = w.acc();
        for c in values.chunks(chunk) {
            let mut part = w.acc();
            part.count(&w, 0, c);
            acc = acc.merge(part);
        }
        let mut sorted = values.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if let Some(v) = acc.finish(&w) {
            prop_assert_eq!(v[0], sorted[rank as usize]);
        }
    }
}

proptest! {
    /// Each chunk's counts above and at the selected value, read off the windowed pass,
    /// equal a direct count of the chunk (ties included: values drawn from a few levels).
    #[test]
    fn piece_counts_are_exact(levels in prop::collection::vec(0u8..12, 1..1500), r in 0usize..1500, stride in 1usize..40, chunk in 1usize..200) {
        let values: Vec<f32> = levels.iter().map(|&l| f32::from(l) * 0.25).collect();
        let rank = (r % values.len()) as u64;
        let mut sample: Vec<u32> = values.iter().step_by(stride).map(|&v| key(v)).collect();
        sample.sort_unstable();
        let w = Windows::from_sample(vec![Request { row: 0, rank }], &[sample.into()], values.len() as u64, 6.0);
        let pieces: Vec<PieceWindow> = values
            .chunks(chunk)
            .enumerate()
            .map(|(i, c)| {
                let mut counted = w.acc();
                counted.count(&w, 0, c);
                PieceWindow::new(i * chunk, c.len() as u64, counted)
            })
            .collect();
        if let Some(v) = PieceWindow::merged(&pieces, &w).finish(&w) {
            for (p, c) in pieces.iter().zip(values.chunks(chunk)) {
                let above = c.iter().filter(|&&x| x > v[0]).count() as u64;
                let equal = c.iter().filter(|&&x| x == v[0]).count() as u64;
                prop_assert_eq!(p.above_equal(&w, 0, v[0]), [above, equal]);
            }
        }
    }
}

#[test]
fn degenerate_windows_count_ties() {
    let mut values = vec![0.0f32; 1000];
    values.extend((1..=100).map(|i| i as f32));
    let mut sample: Vec<u32> = values.iter().step_by(7).map(|&v| key(v)).collect();
    sample.sort_unstable();
    let reqs = vec![
        Request { row: 0, rank: 500 },
        Request { row: 0, rank: 1050 },
    ];
    let w = Windows::from_sample(reqs, &[sample.into()], 1100, 6.0);
    assert_eq!(w.bounds[0], (key(0.0), key(0.0)));
    let mut acc = w.acc();
    acc.count(&w, 0, &values);
    assert_eq!(acc.finish(&w), Some(vec![0.0, 51.0]));
}

#[test]
fn degenerate_windows_count_pieces() {
    let mut values = vec![0.0f32; 1000];
    values.extend((1..=100).map(|i| i as f32));
    let mut sample: Vec<u32> = values.iter().step_by(7).map(|&v| key(v)).collect();
    sample.sort_unstable();
    let w = Windows::from_sample(
        vec![Request { row: 0, rank: 500 }],
        &[sample.into()],
        1100,
        6.0,
    );
    assert_eq!(w.bounds[0], (key(0.0), key(0.0)));
    let pieces: Vec<PieceWindow> = values
        .chunks(137)
        .enumerate()
        .map(|(i, c)| {
            let mut counted = w.acc();
            counted.count(&w, 0, c);
            PieceWindow::new(i * 137, c.len() as u64, counted)
        })
        .collect();
    assert_eq!(PieceWindow::merged(&pieces, &w).finish(&w), Some(vec![0.0]));
    for (p, c) in pieces.iter().zip(values.chunks(137)) {
        let above = c.iter().filter(|&&x| x > 0.0).count() as u64;
        let equal = c.iter().filter(|&&x| x == 0.0).count() as u64;
        assert_eq!(p.above_equal(&w, 0, 0.0), [above, equal]);
    }
}

#[test]
fn piece_windows_stay_within_the_cap() {
    // Every chunk's keys fall inside the window; the worker gives up past its cap in all.
    let w = by_hand(
        vec![Request { row: 0, rank: 0 }],
        vec![(key(0.0), key(10.0))],
        vec![10],
    );
    let mut acc = PieceWindows::default();
    for i in 0..3 {
        let mut counted = w.acc();
        counted.count(&w, 0, &[1.0, 2.0, 3.0, 4.0]);
        acc.push(&w, PieceWindow::new(i * 4, 4, counted));
        assert_eq!(acc.merged(&w).is_some(), i < 2);
    }
    assert!(acc.pieces.is_empty());
    assert!(acc.merge(PieceWindows::default()).merged(&w).is_none());
}

#[test]
fn a_wide_window_takes_the_budget_narrow_ones_leave() {
    // PCB's score select at 0.5 B elements a row: a quantile in the bulk (rank 0.95 d) and
    // the maximum, for 3 rows. An even split of the budget (a sixth each) is less than the
    // quantiles' windows are expected to hold; the maxima's windows hold a handful.
    let total = 500_000_000u64;
    let sample: Vec<u32> = (0..1u32 << 21).map(|i| key(i as f32)).collect();
    let samples = vec![sample; 3];
    let requests: Vec<Request> = (0..3)
        .flat_map(|row| {
            [
                Request {
                    row,
                    rank: total * 95 / 100,
                },
                Request {
                    row,
                    rank: total - 1,
                },
            ]
        })
        .collect();
    let samples: Vec<SampleRow> = samples.into_iter().map(SampleRow::from).collect();
    let w = Windows::from_sample(requests, &samples, total, 6.0);
    assert!(w.viable);
    assert!(w.caps.iter().sum::<usize>() <= WINDOW_BUDGET);
    assert!(w.caps[0] > WINDOW_BUDGET / 6 && w.caps[1] < WINDOW_BUDGET / 6);
    // Ten times the rows: the quantiles' windows no longer fit, and the select says so.
    let w = Windows::from_sample(w.requests, &samples, total * 10, 6.0);
    assert!(!w.viable);
}

#[test]
fn a_bad_guess_declines() {
    let w = by_hand(
        vec![Request { row: 0, rank: 0 }],
        vec![(key(5.0), key(6.0))],
        vec![10],
    );
    let mut acc = w.acc();
    acc.count(&w, 0, &[1.0, 2.0, 5.5]);
    assert_eq!(acc.finish(&w), None);
}

#[test]
fn keys_at_lo_are_counted_not_kept() {
    // A mass of zeros at the window's lower bound (DARE's drops) costs no memory.
    let w = by_hand(
        vec![Request { row: 0, rank: 5 }, Request { row: 0, rank: 7 }],
        vec![(key(0.0), key(3.0)); 2],
        vec![2; 2],
    );
    let values = [0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 9.0];
    let mut acc = w.acc();
    acc.count(&w, 0, &values);
    let p = PieceWindow::new(0, values.len() as u64, acc.clone());
    assert_eq!(acc.finish(&w), Some(vec![0.0, 2.0]));
    assert_eq!(p.above_equal(&w, 0, 0.0), [3, 6]);
    assert_eq!(p.above_equal(&w, 1, 2.0), [1, 1]);
}
