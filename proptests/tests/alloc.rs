//! Properties of the node-local allocator (`gallocy_core::alloc::ExtentAllocator`),
//! checked against a model of the regions and live blocks.

use std::collections::BTreeMap;

use gallocy_core::alloc::{ExtentAllocator, FreeError};
use gallocy_core::types::MIN_ALIGN_BYTES;
use proptest::prelude::*;
use proptest::sample::Index;

const PAGE: u64 = 4096;
/// Regions live above this address (never at 0, like real spaces).
const BASE: u64 = 1 << 30;

#[derive(Clone, Debug)]
enum Op {
    /// Add the next not-yet-added region.
    AddRegion,
    Allocate {
        size: u64,
        align_log2: u32,
    },
    /// Free a live block (picked by index).
    FreeLive(Index),
    /// Free an address that is not the start of a live block.
    FreeBogus(Bogus),
}

#[derive(Clone, Debug)]
enum Bogus {
    /// Inside a live block, past its start.
    InsideLive(Index, u64),
    /// A block freed earlier (double free).
    Freed(Index),
    /// Anywhere near the regions.
    Anywhere(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let size = prop_oneof![
        6 => 0u64..=256,
        3 => 0u64..=3 * PAGE,
        1 => prop_oneof![Just(u64::MAX), Just(u64::MAX - 15), Just(1u64 << 40)],
    ];
    prop_oneof![
        1 => Just(Op::AddRegion),
        6 => (size, 0u32..=13).prop_map(|(size, align_log2)| Op::Allocate { size, align_log2 }),
        4 => any::<Index>().prop_map(Op::FreeLive),
        2 => prop_oneof![
            (any::<Index>(), 1u64..64).prop_map(|(i, o)| Bogus::InsideLive(i, o)),
            any::<Index>().prop_map(Bogus::Freed),
            (0u64..40 * PAGE).prop_map(Bogus::Anywhere),
        ]
        .prop_map(Op::FreeBogus),
    ]
}

/// Disjoint page-aligned regions, some adjacent (gap 0) so coalescing across region
/// boundaries is exercised, in a random order of addition.
fn regions() -> impl Strategy<Value = Vec<(u64, u64)>> {
    proptest::collection::vec(
        (prop_oneof![2 => Just(0u64), 1 => 1u64..=3], 1u64..=4),
        1..6,
    )
    .prop_map(|shape| {
        let mut start = BASE;
        let mut out = Vec::new();
        for (gap_pages, len_pages) in shape {
            start += gap_pages * PAGE;
            out.push((start, len_pages * PAGE));
            start += len_pages * PAGE;
        }
        out
    })
    .prop_shuffle()
}

/// Maximal runs of adjacent added regions: what the free extents must coalesce into.
fn runs(added: &BTreeMap<u64, u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (&start, &len) in added {
        match out.last_mut() {
            Some((s, l)) if *s + *l == start => *l += len,
            _ => out.push((start, len)),
        }
    }
    out
}

/// Free gaps of the model: runs minus live blocks.
fn free_gaps(added: &BTreeMap<u64, u64>, live: &BTreeMap<u64, u64>) -> Vec<(u64, u64)> {
    let mut gaps = Vec::new();
    for (run_start, run_len) in runs(added) {
        let run_end = run_start + run_len;
        let mut cursor = run_start;
        for (&s, &l) in live.range(run_start..run_end) {
            if s > cursor {
                gaps.push((cursor, s - cursor));
            }
            cursor = s + l;
        }
        if run_end > cursor {
            gaps.push((cursor, run_end - cursor));
        }
    }
    gaps
}

fn fits(gap: (u64, u64), size: u64, align: u64) -> bool {
    let aligned = gap.0.div_ceil(align) * align;
    aligned
        .checked_add(size)
        .is_some_and(|end| end <= gap.0 + gap.1)
}

fn check(
    allocator: &ExtentAllocator,
    added: &BTreeMap<u64, u64>,
    live: &BTreeMap<u64, u64>,
) -> Result<(), TestCaseError> {
    allocator
        .check_invariants()
        .map_err(|why| TestCaseError::fail(format!("invariants: {why}")))?;
    let got: BTreeMap<u64, u64> = allocator.live_blocks().collect();
    prop_assert_eq!(&got, live, "live blocks differ from the model");
    prop_assert_eq!(allocator.live_bytes, live.values().sum::<u64>());
    prop_assert_eq!(allocator.region_bytes, added.values().sum::<u64>());
    let regions: BTreeMap<u64, u64> = allocator.regions().collect();
    prop_assert_eq!(&regions, added);
    Ok(())
}

fn run(regions: &[(u64, u64)], ops: &[Op]) -> Result<(), TestCaseError> {
    let mut allocator = ExtentAllocator::new();
    let mut pending = regions.iter().copied();
    let mut added: BTreeMap<u64, u64> = BTreeMap::new();
    let mut live: BTreeMap<u64, u64> = BTreeMap::new();
    let mut freed: Vec<u64> = Vec::new();

    // Start with one region so early allocations can succeed.
    let (start, len) = pending.next().expect("at least one region");
    allocator.add_region(start, len);
    added.insert(start, len);

    for op in ops {
        match op {
            Op::AddRegion => {
                if let Some((start, len)) = pending.next() {
                    allocator.add_region(start, len);
                    added.insert(start, len);
                }
            }
            Op::Allocate { size, align_log2 } => {
                let align = 1u64 << align_log2;
                let effective = align.max(MIN_ALIGN_BYTES);
                let block = ExtentAllocator::block_size(*size);
                match allocator.allocate(*size, align) {
                    Some(addr) => {
                        let block = block.ok_or_else(|| {
                            TestCaseError::fail(format!("allocated an unroundable size {size}"))
                        })?;
                        prop_assert_eq!(
                            addr % effective,
                            0,
                            "{:#x} not aligned to {}",
                            addr,
                            effective
                        );
                        prop_assert_eq!(allocator.size_of(addr), Some(block));
                        prop_assert!(block >= (*size).max(1));
                        // Inside one coalesced run of regions, and in a model gap (so no
                        // overlap with a live block).
                        let gaps = free_gaps(&added, &live);
                        prop_assert!(
                            gaps.iter()
                                .any(|&(s, l)| addr >= s && addr + block <= s + l),
                            "block {:#x}+{:#x} not inside free space {:x?}",
                            addr,
                            block,
                            gaps
                        );
                        // First fit: no lower gap could have held it.
                        let first = gaps.iter().find(|&&g| fits(g, block, effective)).copied();
                        let first_addr = first.map(|(s, _)| s.div_ceil(effective) * effective);
                        prop_assert_eq!(first_addr, Some(addr), "not the first fit");
                        live.insert(addr, block);
                    }
                    None => {
                        // Only when no free gap can hold the rounded, aligned block.
                        if let Some(block) = block {
                            let gaps = free_gaps(&added, &live);
                            prop_assert!(
                                !gaps.iter().any(|&g| fits(g, block, effective)),
                                "refused {size} (align {effective}) though free space {:x?} fits it",
                                gaps
                            );
                        }
                    }
                }
            }
            Op::FreeLive(index) => {
                if live.is_empty() {
                    continue;
                }
                let (&addr, &len) = live.iter().nth(index.index(live.len())).expect("in range");
                prop_assert_eq!(allocator.free(addr), Ok(len));
                live.remove(&addr);
                freed.push(addr);
            }
            Op::FreeBogus(bogus) => {
                let addr = match bogus {
                    Bogus::InsideLive(index, offset) => {
                        if live.is_empty() {
                            continue;
                        }
                        let (&addr, &len) =
                            live.iter().nth(index.index(live.len())).expect("in range");
                        // Blocks are at least 16 bytes, so this stays strictly inside.
                        addr + 1 + (offset - 1) % (len - 1)
                    }
                    Bogus::Freed(index) => {
                        if freed.is_empty() {
                            continue;
                        }
                        freed[index.index(freed.len())]
                    }
                    Bogus::Anywhere(offset) => BASE + offset,
                };
                if live.contains_key(&addr) {
                    // A freed start may have been handed out again; not bogus then.
                    continue;
                }
                let before = format!("{allocator:?}");
                prop_assert_eq!(allocator.free(addr), Err(FreeError::InvalidFree));
                prop_assert_eq!(
                    format!("{allocator:?}"),
                    before,
                    "a refused free changed the allocator"
                );
            }
        }
        check(&allocator, &added, &live)?;
    }

    // Free everything: the free space must be the regions again, coalesced.
    for (&addr, &len) in &live {
        prop_assert_eq!(allocator.free(addr), Ok(len));
    }
    live.clear();
    check(&allocator, &added, &live)?;
    prop_assert_eq!(allocator.live_bytes, 0);
    // Each run of adjacent regions must be one free extent again: a block of the whole
    // run fits. Largest first, so first fit lands on the run we expect.
    let mut all_runs = runs(&added);
    all_runs.sort_by_key(|&(start, len)| (std::cmp::Reverse(len), start));
    for (start, len) in all_runs {
        prop_assert_eq!(
            allocator.allocate(len, MIN_ALIGN_BYTES),
            Some(start),
            "run {:#x}+{:#x} did not coalesce",
            start,
            len
        );
        live.insert(start, len);
    }
    check(&allocator, &added, &live)?;
    prop_assert_eq!(allocator.live_bytes, allocator.region_bytes);
    prop_assert_eq!(
        allocator.allocate(1, 1),
        None,
        "allocated from a full allocator"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn allocator_model(regions in regions(), ops in proptest::collection::vec(op(), 0..200)) {
        run(&regions, &ops)?;
    }
}
