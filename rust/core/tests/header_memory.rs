//! A header listing many tensors is parsed within about twice its own size (the old parser
//! built a JSON tree first and needed ~40x). Measured with a counting allocator, so the figure
//! is exact and independent of the machine.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn parse_memory_is_bounded_by_the_header_size() {
    let n = 300_000;
    let mut text = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    for i in 0..n {
        text.push_str(&format!(
            ",\"layers.{i}.w\":{{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[{},{}]}}",
            4 * i,
            4 * i + 4
        ));
    }
    text.push('}');
    let mut file = (text.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(text.as_bytes());
    file.resize(file.len() + 4 * n, 0);
    drop(text);

    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let h = weightweave_core::header::parse("f", &file).unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    let kept = LIVE.load(Ordering::Relaxed) - before;
    let header_len = file.len() - 4 * n - 8;
    assert_eq!(h.len(), n);
    println!("header {header_len} B, peak {peak} B, kept {kept} B");
    assert!(
        peak < 2 * header_len,
        "peak {peak} for a {header_len}-byte header"
    );
    assert!(
        kept < header_len,
        "kept {kept} for a {header_len}-byte header"
    );
}
