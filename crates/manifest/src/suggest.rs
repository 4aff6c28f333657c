//! "Did you mean ...?" hints for misspelt keys and service names.

/// The candidate closest to `input`, if it is close enough to be a plausible typo.
pub(crate) fn closest<'a, I>(input: &str, candidates: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    let input_lower = input.to_lowercase();
    candidates
        .into_iter()
        .map(|c| (edit_distance(&input_lower, &c.to_lowercase()), c))
        .filter(|&(distance, c)| {
            // About one edit per three characters: catches typos without pairing unrelated short words.
            let limit = input.chars().count().max(c.chars().count()).div_ceil(3);
            distance <= limit.max(1)
        })
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, c)| c)
}

/// Levenshtein distance, counted in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        current[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("ordrs", "orders"), 1);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    #[test]
    fn suggests_only_near_misses() {
        let keys = ["build", "run", "replicas", "depends_on", "health"];
        assert_eq!(closest("replica", keys), Some("replicas"));
        assert_eq!(closest("Helth", keys), Some("health"));
        assert_eq!(closest("dependson", keys), Some("depends_on"));
        assert_eq!(closest("rum", keys), Some("run"));
        assert_eq!(closest("command", keys), None);
        assert_eq!(closest("xy", ["ab"]), None);
    }
}
