//! A seeded, stratified, duplicate-aware train/validation/test split.
//!
//! What it is: each class is split on its own in the requested fractions (stratified), so
//! every split has the classes in the same proportions. Byte-identical files (same sha256)
//! form a *group* that always lands in a single split, otherwise a model could be tested on
//! an image it was trained on. Groups, not images, are shuffled, with `StdRng` seeded from
//! `seed`: the same dataset and seed always give the same split.
//!
//! What it is not: it moves no pixels; a [`Split`] is three lists of indices into the
//! [`Dataset`]. It does not look for near-duplicates (only byte-identical files).

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::load::Dataset;

/// Indices into a [`Dataset`], one list per split, each sorted ascending.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Split {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub test: Vec<usize>,
    /// How many sets of byte-identical files (2 or more files each) the dataset has.
    pub duplicate_groups: usize,
    /// How many files are in those sets, in total.
    pub duplicate_files: usize,
    /// The seed the split was made with.
    pub seed: u64,
}

impl Split {
    /// One line for logs, e.g.
    /// `split: train 41267, val 11791, test 5896; 348 duplicate groups (788 files) kept together`.
    pub fn summary(&self) -> String {
        format!(
            "split: train {}, val {}, test {}; {} duplicate groups ({} files) kept together",
            self.train.len(),
            self.val.len(),
            self.test.len(),
            self.duplicate_groups,
            self.duplicate_files
        )
    }
}

/// Splits `ds` into train/val/test in the proportions `fractions` (e.g. `[0.7, 0.2, 0.1]`).
///
/// Per class, the boundaries are `floor(n * f_train)` and `floor(n * (f_train + f_val))`, so
/// each split's count is within 1 of its fraction (exact for classes without duplicates).
/// `fractions` are normalised to sum to 1; negative or NaN entries count as 0, and if nothing
/// is left everything goes to train.
pub fn split_dataset(ds: &Dataset, seed: u64, fractions: [f64; 3]) -> Split {
    let groups = duplicate_groups(ds);
    let fractions = normalised(fractions);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut parts: [Vec<usize>; 3] = Default::default();
    for class_groups in groups_by_class(ds, &groups) {
        let mut class_groups = class_groups;
        class_groups.shuffle(&mut rng);
        let targets = class_targets(count_images(&class_groups), fractions);
        assign_groups(&class_groups, targets, &mut parts);
    }
    for part in &mut parts {
        part.sort_unstable();
    }
    let [train, val, test] = parts;
    let duplicates: Vec<&Vec<usize>> = groups.iter().filter(|g| g.len() > 1).collect();
    Split {
        train,
        val,
        test,
        duplicate_groups: duplicates.len(),
        duplicate_files: duplicates.iter().map(|g| g.len()).sum(),
        seed,
    }
}

/// Groups image indices by file hash, in order of first appearance; each member list is
/// ascending. Most groups have one member.
fn duplicate_groups(ds: &Dataset) -> Vec<Vec<usize>> {
    let mut group_of_hash: HashMap<&[u8; 32], usize> = HashMap::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, hash) in ds.hashes.iter().enumerate() {
        let g = *group_of_hash.entry(hash).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(i);
    }
    groups
}

/// The groups of each class, a group belonging to the class of its first member
/// (so a group spanning classes still stays in one split). Order: by label.
fn groups_by_class<'a>(ds: &Dataset, groups: &'a [Vec<usize>]) -> Vec<Vec<&'a [usize]>> {
    let mut by_class: Vec<Vec<&[usize]>> = vec![Vec::new(); ds.classes.len()];
    for group in groups {
        let label = ds.labels[group[0]] as usize;
        by_class[label].push(group);
    }
    by_class
}

fn count_images(groups: &[&[usize]]) -> usize {
    groups.iter().map(|g| g.len()).sum()
}

/// Makes the fractions non-negative and summing to 1.
fn normalised(fractions: [f64; 3]) -> [f64; 3] {
    let clean = fractions.map(|f| if f.is_finite() && f > 0.0 { f } else { 0.0 });
    let total: f64 = clean.iter().sum();
    if total <= 0.0 {
        return [1.0, 0.0, 0.0];
    }
    clean.map(|f| f / total)
}

/// How many images of a class of `n` should go to train, val and test.
fn class_targets(n: usize, fractions: [f64; 3]) -> [usize; 3] {
    // The tiny epsilon keeps 0.7 * 10000 = 6999.999... from flooring to 6999.
    let boundary = |f: f64| ((n as f64 * f + 1e-9).floor() as usize).min(n);
    let end_train = boundary(fractions[0]);
    let end_val = boundary(fractions[0] + fractions[1]).max(end_train);
    [end_train, end_val - end_train, n - end_val]
}

/// Hands out groups in their (shuffled) order: each goes to the first split, in the order
/// train, val, test, that still has room for all of it; if none has, to the split with
/// the most room left. Without duplicates this hits `targets` exactly.
fn assign_groups(groups: &[&[usize]], targets: [usize; 3], parts: &mut [Vec<usize>; 3]) {
    let mut room = targets.map(|t| t as isize);
    for group in groups {
        let size = group.len() as isize;
        let chosen = (0..3).find(|&s| room[s] >= size).unwrap_or_else(|| most_room(&room));
        room[chosen] -= size;
        parts[chosen].extend_from_slice(group);
    }
}

fn most_room(room: &[isize; 3]) -> usize {
    // Ties go to the earlier split (train before val before test).
    (0..3).rev().max_by_key(|&s| room[s]).unwrap_or(0)
}
