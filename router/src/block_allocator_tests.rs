use std::collections::HashSet;

use proptest::prelude::*;

use super::*;

#[test]
fn allocates_whole_blocks_never_block_zero_and_frees_on_drop() {
    let a = BlockAllocator::new(64, 16, false);
    assert_eq!(a.total_blocks(), 4);
    let x = a.allocate(None, 17).unwrap();
    assert_eq!(x.blocks, vec![1, 2]);
    assert_eq!(x.slots.len(), 17);
    assert_eq!(x.slots[16], 32);
    let y = a.allocate(None, 32).unwrap();
    assert!(!y.blocks.contains(&0));
    assert!(a.allocate(None, 1).is_none());
    drop(x);
    assert_eq!(a.free_blocks(), 2);
    let z = a.allocate(None, 20).unwrap();
    assert_eq!(
        z.blocks,
        vec![1, 2],
        "recently freed blocks are reused first"
    );
    drop((y, z));
    assert_eq!(a.free_blocks(), 4);
}

#[test]
fn a_finished_prompt_is_reused_and_an_unfinished_one_is_not() {
    let a = BlockAllocator::new(16 * 16, 16, true);
    let prompt: Vec<u32> = (0..40).collect();
    let first = a.allocate(Some(&prompt), 50).unwrap();
    assert_eq!(first.cache_len, 0);
    let first_blocks = first.blocks.clone();
    // Dropped before its prefill finished: nothing may be cached.
    drop(first);
    assert_eq!(a.cached_blocks(), 0);
    let second = a.allocate(Some(&prompt), 50).unwrap();
    second.mark_prefilled();
    let second_blocks = second.blocks.clone();
    drop(second);
    assert_eq!(
        a.cached_blocks(),
        2,
        "two whole 16-token blocks of a 40-token prompt"
    );
    let third = a.allocate(Some(&prompt), 50).unwrap();
    assert_eq!(third.cache_len, 32);
    assert_eq!(&third.blocks[..2], &second_blocks[..2]);
    assert_eq!(
        third.slots[..32],
        (0..32)
            .map(|i| third.blocks[i / 16] * 16 + i as u32 % 16)
            .collect::<Vec<_>>()[..]
    );
    // A prompt that is exactly cached still computes its last block.
    let exact: Vec<u32> = (0..32).collect();
    let fourth = a.allocate(Some(&exact), 40).unwrap();
    assert_eq!(fourth.cache_len, 16);
    let _ = first_blocks;
    drop((third, fourth));
    assert_eq!(a.free_blocks() + a.cached_blocks(), a.total_blocks());
}

#[test]
fn cached_blocks_are_evicted_when_the_free_list_runs_dry() {
    let a = BlockAllocator::new(4 * 16, 16, true);
    let p: Vec<u32> = (100..164).collect();
    let x = a.allocate(Some(&p), 64).unwrap();
    x.mark_prefilled();
    drop(x);
    assert_eq!(
        (a.free_blocks(), a.cached_blocks()),
        (0, 4),
        "64 prompt tokens: 4 whole blocks"
    );
    // An unrelated request needing every block evicts the cache.
    let y = a.allocate(Some(&[1, 2, 3]), 64).unwrap();
    assert_eq!(y.blocks.len(), 4);
    assert_eq!(a.cached_blocks(), 0);
    drop(y);
}

#[derive(Debug, Clone)]
enum Op {
    /// Allocate for prompt family `f` (prompts share prefixes), prompt length, extra positions.
    Alloc(u8, u16, u16),
    /// Mark the i-th live allocation prefilled.
    Prefill(usize),
    /// Drop the i-th live allocation.
    Free(usize),
    Invalidate,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 1u16..80, 0u16..40).prop_map(|(f, n, e)| Op::Alloc(f, n, e)),
        2 => (0usize..8).prop_map(Op::Prefill),
        3 => (0usize..8).prop_map(Op::Free),
        1 => Just(Op::Invalidate),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Under any interleaving of allocate, prefill, free, evict (inside allocate) and
    /// invalidate: no block is owned twice, block 0 is never handed out, shared blocks are
    /// only ever shared through the cache, and at the end every block is free or cached.
    #[test]
    fn no_block_is_owned_twice_or_leaked(ops in proptest::collection::vec(op(), 1..60), caching in any::<bool>()) {
        let a = BlockAllocator::new(24 * 8, 8, caching);
        let total = a.total_blocks();
        let mut live: Vec<BlockAllocation> = Vec::new();
        for op in ops {
            match op {
                Op::Alloc(family, len, extra) => {
                    let prompt: Vec<u32> = (0..len as u32).map(|i| i * 7 + family as u32 * (i / 16)).collect();
                    if let Some(x) = a.allocate(Some(&prompt), len as u32 + extra as u32) {
                        prop_assert!(x.cache_len < len as u32);
                        prop_assert_eq!(x.slots.len(), (len + extra) as usize);
                        live.push(x);
                    }
                }
                Op::Prefill(i) => if let Some(x) = live.get(i) { x.mark_prefilled() },
                Op::Free(i) => if i < live.len() { live.swap_remove(i); },
                Op::Invalidate => a.invalidate_cache(),
            }
            // Blocks not shared through the cache belong to exactly one live allocation.
            let mut owned = HashSet::new();
            let mut shared = HashSet::new();
            for x in &live {
                for (j, &b) in x.blocks.iter().enumerate() {
                    prop_assert!(b != 0);
                    if j < x.matched.blocks.len() {
                        shared.insert(b);
                    } else {
                        prop_assert!(owned.insert(b), "block {} owned twice", b);
                    }
                }
            }
            prop_assert!(owned.is_disjoint(&shared));
            let free = a.pool.lock().unwrap().free.clone();
            let free_set: HashSet<u32> = free.iter().copied().collect();
            prop_assert_eq!(free_set.len(), free.len(), "a block is free twice");
            prop_assert!(free_set.is_disjoint(&owned) && free_set.is_disjoint(&shared));
            prop_assert!(owned.len() + a.free_blocks() + a.cached_blocks() <= total);
        }
        drop(live);
        prop_assert_eq!(a.free_blocks() + a.cached_blocks(), total);
        a.invalidate_cache();
        prop_assert_eq!(a.free_blocks(), total, "everything comes back");
    }
}
