//! The prefix cache: a trie of KV blocks keyed on block-sized chunks of prompt tokens.
//!
//! Node `n` at depth `d` holds the block whose K/V covers prompt tokens `d*B..(d+1)*B` of every
//! prompt that starts with the chunks on the path to `n`. A new request walks the trie along
//! its prompt and reuses the longest chain it finds (`cache_len` tokens the shard need not
//! compute). Nodes count the requests using them; only unreferenced leaves can be evicted,
//! least recently used first, and an ordered set of them makes eviction O(log n). Lookups hash
//! one chunk per block, so they cost microseconds.
//!
//! Blocks enter the trie only when a request that computed them ends after a successful
//! prefill (`insert`), so a cached block always holds finished K/V. When the shards' memory
//! can no longer be trusted (a failed or restarted shard), `invalidate` retires every node:
//! unreferenced ones at once, the others as their last user lets go.

use std::collections::{BTreeSet, HashMap};

const ROOT: usize = 0;

struct Node {
    parent: usize,
    key: Vec<u32>,
    block: u32,
    children: HashMap<Vec<u32>, usize>,
    refs: usize,
    last_used: u64,
    /// Retired by `invalidate`: never matched again, removed when unreferenced.
    stale: bool,
}

pub struct PrefixCache {
    block_size: usize,
    nodes: Vec<Option<Node>>,
    spare: Vec<usize>,
    /// Unreferenced leaves by last use: the eviction order.
    evictable: BTreeSet<(u64, usize)>,
    tick: u64,
    cached: usize,
}

/// What a lookup matched: the nodes (root first) and so the blocks of the cached prefix.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Match {
    pub nodes: Vec<usize>,
    pub blocks: Vec<u32>,
}

impl PrefixCache {
    pub fn new(block_size: usize) -> Self {
        let root = Node {
            parent: ROOT,
            key: Vec::new(),
            block: 0,
            children: HashMap::new(),
            refs: 0,
            last_used: 0,
            stale: false,
        };
        Self {
            block_size: block_size.max(1),
            nodes: vec![Some(root)],
            spare: Vec::new(),
            evictable: BTreeSet::new(),
            tick: 0,
            cached: 0,
        }
    }

    /// Blocks held by the trie (in use or evictable).
    pub fn cached_blocks(&self) -> usize {
        self.cached
    }

    fn node(&self, id: usize) -> &Node {
        self.nodes[id].as_ref().expect("live node")
    }

    fn node_mut(&mut self, id: usize) -> &mut Node {
        self.nodes[id].as_mut().expect("live node")
    }

    fn is_evictable(&self, id: usize) -> bool {
        let n = self.node(id);
        id != ROOT && n.refs == 0 && n.children.is_empty()
    }

    /// Keeps `evictable` in step with node `id` after its refs or children changed.
    fn update(&mut self, id: usize, before: Option<u64>) {
        if let Some(t) = before {
            self.evictable.remove(&(t, id));
        }
        if self.is_evictable(id) {
            self.evictable.insert((self.node(id).last_used, id));
        }
    }

    fn touch(&mut self, id: usize) {
        self.tick += 1;
        let old = self.node(id).last_used;
        self.node_mut(id).last_used = self.tick;
        self.update(id, Some(old));
    }

    /// The longest cached chain of whole blocks of `tokens`, at most `max_blocks` long; every
    /// matched node gains a reference (give it back with `release`).
    pub fn lookup(&mut self, tokens: &[u32], max_blocks: usize) -> Match {
        let mut m = Match::default();
        let mut at = ROOT;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            match self.node(at).children.get(chunk) {
                Some(&child) if !self.node(child).stale => at = child,
                _ => break,
            }
            m.nodes.push(at);
            m.blocks.push(self.node(at).block);
        }
        for &id in &m.nodes {
            self.node_mut(id).refs += 1;
            self.touch(id);
        }
        m
    }

    /// Drops the references a `lookup` took. Returns blocks freed by retired nodes.
    pub fn release(&mut self, nodes: &[usize]) -> Vec<u32> {
        let mut freed = Vec::new();
        for &id in nodes.iter().rev() {
            self.node_mut(id).refs -= 1;
            self.touch(id);
        }
        for &id in nodes.iter().rev() {
            self.collect_stale(id, &mut freed);
        }
        freed
    }

    /// Removes retired node `id` (and retired ancestors) once nothing uses it.
    fn collect_stale(&mut self, mut id: usize, freed: &mut Vec<u32>) {
        while self.nodes[id].is_some() && self.node(id).stale && self.is_evictable(id) {
            let parent = self.node(id).parent;
            freed.push(self.remove(id));
            id = parent;
        }
    }

    fn remove(&mut self, id: usize) -> u32 {
        let node = self.nodes[id].take().expect("live node");
        self.evictable.remove(&(node.last_used, id));
        let parent = node.parent;
        if let Some(p) = self.nodes[parent].as_mut() {
            p.children.remove(&node.key);
        }
        let before = self.nodes[parent].as_ref().map(|p| p.last_used);
        self.update(parent, before);
        self.spare.push(id);
        self.cached -= 1;
        node.block
    }

    /// Adds the whole blocks of a finished prompt after its matched prefix `after` (the last
    /// node of its `Match`, or the root). `blocks[i]` holds prompt chunk `prefix_len + i`.
    /// Returns the blocks the trie did not take (a chunk already cached by someone else, or a
    /// retired path): the caller frees them.
    pub fn insert(&mut self, after: Option<usize>, chunks: &[&[u32]], blocks: &[u32]) -> Vec<u32> {
        let mut at = after.unwrap_or(ROOT);
        let mut rejected = Vec::new();
        let mut i = 0;
        while i < chunks.len() {
            let (chunk, block) = (chunks[i], blocks[i]);
            if self.node(at).stale || chunk.len() != self.block_size {
                rejected.extend_from_slice(&blocks[i..]);
                break;
            }
            if let Some(&existing) = self.node(at).children.get(chunk) {
                // Someone cached the same tokens first: keep theirs, free ours.
                rejected.push(block);
                at = existing;
                i += 1;
                continue;
            }
            let id = self.spare.pop().unwrap_or_else(|| {
                self.nodes.push(None);
                self.nodes.len() - 1
            });
            self.nodes[id] = Some(Node {
                parent: at,
                key: chunk.to_vec(),
                block,
                children: HashMap::new(),
                refs: 0,
                last_used: 0,
                stale: false,
            });
            let before = self.node(at).last_used;
            self.node_mut(at).children.insert(chunk.to_vec(), id);
            self.update(at, Some(before));
            self.cached += 1;
            self.touch(id);
            at = id;
            i += 1;
        }
        rejected
    }

    /// Frees up to `n` blocks by evicting the least recently used unreferenced leaves.
    pub fn evict(&mut self, n: usize) -> Vec<u32> {
        let mut freed = Vec::with_capacity(n.min(self.evictable.len()));
        while freed.len() < n {
            let Some(&(_, id)) = self.evictable.iter().next() else {
                break;
            };
            freed.push(self.remove(id));
        }
        freed
    }

    /// Retires every cached block: unreferenced ones are returned now, the rest when released.
    pub fn invalidate(&mut self) -> Vec<u32> {
        for node in self.nodes.iter_mut().skip(1).flatten() {
            node.stale = true;
        }
        // Evicting a leaf can make its parent a leaf: one pass takes the whole unused tree.
        self.evict(usize::MAX)
    }
}

#[cfg(test)]
#[path = "radix_tests.rs"]
mod tests;
