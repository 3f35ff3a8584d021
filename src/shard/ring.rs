//! Rendezvous (highest random weight) hashing of tokens onto members: a token's owner is the
//! member with the highest weight for it, its standby the second highest. A member that joins
//! takes only the tokens it now weighs highest for; a member that leaves hands each of its tokens
//! to that token's standby, and no other token moves.

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};

use crate::domain::TokenHash;

/// Keeps these hashes apart from every other SHA-256 of the same fields.
const DOMAIN: &[u8] = b"crownstone-webhooks/shard-weight/v1";

/// The weight of a member for a token: the first 8 bytes of a SHA-256, the same on every
/// replica and every build (no `std` hasher, whose output may change between Rust versions).
pub fn weight(token: &TokenHash, member: &str) -> u64 {
    let mut hash = Sha256::new();
    hash.update(DOMAIN);
    hash.update(token.as_bytes());
    hash.update((member.len() as u64).to_be_bytes());
    hash.update(member.as_bytes());
    let hash = hash.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(first)
}

/// A set of member identities, sorted and without repeats, that tokens hash onto.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ring {
    members: Vec<String>,
}

/// A token whose owner differs between two rings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub token: TokenHash,
    /// The owner before; `None` when the ring before was empty.
    pub from: Option<String>,
    /// The owner after; `None` when the ring after is empty.
    pub to: Option<String>,
}

impl Ring {
    /// A ring of these members; repeats count once.
    pub fn new(members: impl IntoIterator<Item = String>) -> Self {
        let members: BTreeSet<String> = members.into_iter().collect();
        Ring {
            members: members.into_iter().collect(),
        }
    }

    /// The members, sorted.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// The member with the highest weight for the token; `None` when the ring is empty.
    pub fn owner(&self, token: &TokenHash) -> Option<&str> {
        self.top_two(token).0
    }

    /// The member with the second highest weight for the token, never the owner; `None` with
    /// fewer than two members.
    pub fn standby(&self, token: &TokenHash) -> Option<&str> {
        self.top_two(token).1
    }

    /// The owner and the standby together, for one pass over the members.
    pub fn owner_and_standby(&self, token: &TokenHash) -> (Option<&str>, Option<&str>) {
        self.top_two(token)
    }

    /// The tokens whose owner differs between `before` and `after`, in the order given.
    pub fn moves<'a>(
        before: &Ring,
        after: &Ring,
        tokens: impl IntoIterator<Item = &'a TokenHash>,
    ) -> Vec<Move> {
        tokens
            .into_iter()
            .filter_map(|token| {
                let from = before.owner(token);
                let to = after.owner(token);
                (from != to).then(|| Move {
                    token: *token,
                    from: from.map(str::to_owned),
                    to: to.map(str::to_owned),
                })
            })
            .collect()
    }

    /// Ties in weight (a 2^-64 chance) go to the smaller identity, so every replica still agrees.
    fn top_two(&self, token: &TokenHash) -> (Option<&str>, Option<&str>) {
        let mut first: Option<(u64, &str)> = None;
        let mut second: Option<(u64, &str)> = None;
        // Members are sorted ascending, so a strictly greater weight is needed to win a tie.
        for member in &self.members {
            let candidate = (weight(token, member), member.as_str());
            match first {
                Some(best) if candidate.0 <= best.0 => {
                    if second.is_none_or(|runner_up| candidate.0 > runner_up.0) {
                        second = Some(candidate);
                    }
                }
                _ => {
                    second = first;
                    first = Some(candidate);
                }
            }
        }
        (first.map(|(_, m)| m), second.map(|(_, m)| m))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn ring(members: &[&str]) -> Ring {
        Ring::new(members.iter().map(|m| m.to_string()))
    }

    fn tokens(count: usize) -> Vec<TokenHash> {
        (0..count)
            .map(|i| TokenHash::of(&format!("token-{i}")))
            .collect()
    }

    /// The owner by brute force: the member with the highest weight, ties to the smaller name.
    fn ranked(ring: &Ring, token: &TokenHash) -> Vec<String> {
        let mut members = ring.members().to_vec();
        members.sort_by(|a, b| weight(token, b).cmp(&weight(token, a)).then(a.cmp(b)));
        members
    }

    #[test]
    fn the_weight_is_fixed_across_builds() {
        // A change here reshuffles every token between replicas of different versions.
        let token = TokenHash::of("token");
        assert_eq!(weight(&token, "pod-a"), weight(&token, "pod-a"));
        assert_ne!(weight(&token, "pod-a"), weight(&token, "pod-b"));
        // SHA-256 of the domain, the token's hash, the identity's length and the identity.
        assert_eq!(weight(&token, "pod-a"), 0x4b5e4fbcd86b068d);
    }

    #[test]
    fn members_are_sorted_and_deduplicated() {
        let ring = ring(&["c", "a", "b", "a"]);
        assert_eq!(ring.members(), ["a", "b", "c"]);
        assert_eq!(ring.len(), 3);
    }

    #[test]
    fn an_empty_ring_has_no_owner_and_one_member_no_standby() {
        let token = TokenHash::of("t");
        assert_eq!(Ring::default().owner(&token), None);
        assert_eq!(Ring::default().standby(&token), None);
        let single = ring(&["only"]);
        assert_eq!(single.owner(&token), Some("only"));
        assert_eq!(single.standby(&token), None);
    }

    #[test]
    fn owner_and_standby_are_the_two_highest_weights() {
        let ring = ring(&["a", "b", "c", "d", "e"]);
        for token in tokens(500) {
            let ranked = ranked(&ring, &token);
            assert_eq!(ring.owner(&token), Some(ranked[0].as_str()));
            assert_eq!(ring.standby(&token), Some(ranked[1].as_str()));
        }
    }

    #[test]
    fn the_order_members_come_in_does_not_matter() {
        let one = ring(&["pod-a", "pod-b", "pod-c"]);
        let other = ring(&["pod-c", "pod-a", "pod-b", "pod-c"]);
        for token in tokens(1000) {
            assert_eq!(
                one.owner_and_standby(&token),
                other.owner_and_standby(&token)
            );
        }
    }

    #[test]
    fn three_members_share_10_000_tokens_about_evenly() {
        let ring = ring(&["pod-a", "pod-b", "pod-c"]);
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for token in tokens(10_000) {
            *counts.entry(ring.owner(&token).unwrap()).or_default() += 1;
        }
        assert_eq!(counts.len(), 3);
        for (member, count) in counts {
            // Even is 3,333; the band is many standard deviations (about 47) wide.
            assert!((3_000..=3_700).contains(&count), "{member} owns {count}");
        }
    }

    #[test]
    fn a_joining_member_takes_about_its_share_and_only_for_itself() {
        let before = ring(&["pod-a", "pod-b", "pod-c"]);
        let after = ring(&["pod-a", "pod-b", "pod-c", "pod-d"]);
        let tokens = tokens(10_000);
        let moves = Ring::moves(&before, &after, &tokens);
        for m in &moves {
            assert_eq!(m.to.as_deref(), Some("pod-d"));
        }
        // Even is 1/4 of 10,000.
        assert!(
            (2_200..=2_800).contains(&moves.len()),
            "{} moved",
            moves.len()
        );
    }

    #[test]
    fn a_leaving_members_tokens_go_to_their_standby_and_nothing_else_moves() {
        let before = ring(&["pod-a", "pod-b", "pod-c", "pod-d"]);
        let after = ring(&["pod-a", "pod-c", "pod-d"]);
        let tokens = tokens(10_000);
        let owned_by_b = tokens
            .iter()
            .filter(|t| before.owner(t) == Some("pod-b"))
            .count();
        let moves = Ring::moves(&before, &after, &tokens);
        assert_eq!(moves.len(), owned_by_b);
        for m in &moves {
            assert_eq!(m.from.as_deref(), Some("pod-b"));
            assert_eq!(m.to.as_deref(), before.standby(&m.token));
        }
    }

    #[test]
    fn moves_to_and_from_an_empty_ring_name_no_member() {
        let token = TokenHash::of("t");
        let moves = Ring::moves(&Ring::default(), &ring(&["a"]), [&token]);
        assert_eq!(
            moves,
            [Move {
                token,
                from: None,
                to: Some("a".into())
            }]
        );
        let moves = Ring::moves(&ring(&["a"]), &Ring::default(), [&token]);
        assert_eq!(moves[0].from.as_deref(), Some("a"));
        assert_eq!(moves[0].to, None);
    }

    fn members() -> impl Strategy<Value = BTreeSet<String>> {
        prop::collection::btree_set("[a-z0-9-]{1,12}", 1..8)
    }

    proptest! {
        #[test]
        fn every_token_has_one_owner_among_the_members_and_a_different_standby(
            members in members(),
            token in ".*",
        ) {
            let ring = Ring::new(members.clone());
            let token = TokenHash::of(&token);
            let owner = ring.owner(&token).unwrap();
            prop_assert!(members.contains(owner));
            let ranked = ranked(&ring, &token);
            prop_assert_eq!(owner, ranked[0].as_str());
            match ring.standby(&token) {
                Some(standby) => {
                    prop_assert!(members.contains(standby));
                    prop_assert_ne!(standby, owner);
                }
                None => prop_assert_eq!(members.len(), 1),
            }
        }

        #[test]
        fn adding_a_member_moves_tokens_only_to_it(
            members in members(),
            joining in "[a-z0-9-]{1,12}",
            seeds in prop::collection::vec(".*", 1..50),
        ) {
            prop_assume!(!members.contains(&joining));
            let before = Ring::new(members.clone());
            let after = Ring::new(members.into_iter().chain([joining.clone()]));
            let tokens: Vec<_> = seeds.iter().map(|s| TokenHash::of(s)).collect();
            for m in Ring::moves(&before, &after, &tokens) {
                prop_assert_eq!(m.to, Some(joining.clone()));
            }
        }

        #[test]
        fn removing_a_member_moves_only_its_tokens_each_to_its_standby(
            members in prop::collection::btree_set("[a-z0-9-]{1,12}", 2..8),
            leaving in any::<prop::sample::Index>(),
            seeds in prop::collection::vec(".*", 1..50),
        ) {
            let before = Ring::new(members.clone());
            let leaving = before.members()[leaving.index(members.len())].clone();
            let after = Ring::new(members.into_iter().filter(|m| *m != leaving));
            let tokens: Vec<_> = seeds.iter().map(|s| TokenHash::of(s)).collect();
            for token in &tokens {
                let moved = before.owner(token) != after.owner(token);
                prop_assert_eq!(moved, before.owner(token) == Some(leaving.as_str()));
                if moved {
                    prop_assert_eq!(after.owner(token), before.standby(token));
                }
            }
        }
    }
}
