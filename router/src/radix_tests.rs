use super::*;

fn toks(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| i.wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn longest_whole_block_prefix_is_matched_and_referenced() {
    let mut c = PrefixCache::new(4);
    let p = toks(10, 1);
    let chunks: Vec<&[u32]> = p.chunks_exact(4).collect();
    assert!(c.insert(None, &chunks, &[7, 8]).is_empty());
    assert_eq!(c.cached_blocks(), 2);
    let m = c.lookup(&p, usize::MAX);
    assert_eq!(m.blocks, vec![7, 8]);
    // Referenced nodes cannot be evicted.
    assert!(c.evict(5).is_empty());
    assert!(c.release(&m.nodes).is_empty());
    // A prompt diverging in the second block shares only the first.
    let mut q = p.clone();
    q[5] += 1;
    let m = c.lookup(&q, usize::MAX);
    assert_eq!(m.blocks, vec![7]);
    c.release(&m.nodes);
    // max_blocks caps the match.
    let m = c.lookup(&p, 1);
    assert_eq!(m.blocks, vec![7]);
    c.release(&m.nodes);
}

#[test]
fn duplicates_are_rejected_and_eviction_is_lru_leaves_first() {
    let mut c = PrefixCache::new(2);
    let a = toks(4, 1);
    let b = toks(4, 2);
    let ca: Vec<&[u32]> = a.chunks_exact(2).collect();
    let cb: Vec<&[u32]> = b.chunks_exact(2).collect();
    assert!(c.insert(None, &ca, &[1, 2]).is_empty());
    assert_eq!(c.insert(None, &ca, &[3, 4]), vec![3, 4], "already cached");
    assert!(c.insert(None, &cb, &[5, 6]).is_empty());
    // `a` is older: its leaf goes first, then its parent (now a leaf), then `b`'s.
    assert_eq!(c.evict(1), vec![2]);
    assert_eq!(c.evict(1), vec![1]);
    assert_eq!(c.evict(9), vec![6, 5]);
    assert_eq!(c.cached_blocks(), 0);
}

#[test]
fn invalidate_retires_in_use_nodes_when_released() {
    let mut c = PrefixCache::new(2);
    let a = toks(6, 3);
    let ca: Vec<&[u32]> = a.chunks_exact(2).collect();
    c.insert(None, &ca, &[1, 2, 3]);
    let m = c.lookup(&a, 2);
    let mut freed = c.invalidate();
    assert_eq!(freed, vec![3], "only the unreferenced leaf goes now");
    assert!(
        c.lookup(&a, 3).blocks.is_empty(),
        "retired nodes never match"
    );
    // Inserting under a retired node is refused.
    assert_eq!(c.insert(m.nodes.last().copied(), &ca[2..], &[9]), vec![9]);
    freed.extend(c.release(&m.nodes));
    freed.sort();
    assert_eq!(freed, vec![1, 2, 3]);
    assert_eq!(c.cached_blocks(), 0);
}

#[test]
fn lookups_take_microseconds() {
    let mut c = PrefixCache::new(16);
    for s in 0..500 {
        let p = toks(1024, s);
        let chunks: Vec<&[u32]> = p.chunks_exact(16).collect();
        let blocks: Vec<u32> = (0..chunks.len() as u32).map(|i| s * 64 + i + 1).collect();
        c.insert(None, &chunks, &blocks);
    }
    let p = toks(1024, 250);
    let start = std::time::Instant::now();
    for _ in 0..100 {
        let m = c.lookup(&p, usize::MAX);
        assert_eq!(m.blocks.len(), 64);
        c.release(&m.nodes);
    }
    let per = start.elapsed() / 100;
    eprintln!("lookup of a 1024-token prompt among 32000 cached blocks: {per:?}");
}
