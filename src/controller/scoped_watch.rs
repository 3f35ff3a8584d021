//! One watch stream over the operator's namespaces: a cluster-wide watch when it watches all of
//! them, else one watch per namespace merged into a stream that reads like a single watch, so
//! the caches and controllers fed by it need not know how many namespaces there are.

use std::collections::{HashMap, HashSet, VecDeque};

use futures::stream::{self, BoxStream};
use futures::{Stream, StreamExt};
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt};

use crate::config::WatchScope;

/// What one watch yields.
pub type WatchResult<K> = Result<Event<K>, watcher::Error>;

/// The Apis of `K` for `scope`: one cluster-wide, or one per watched namespace.
pub fn scoped_apis<K>(client: &Client, scope: &WatchScope) -> Vec<Api<K>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match scope.namespaces() {
        None => vec![Api::all(client.clone())],
        Some(namespaces) => namespaces
            .iter()
            .map(|namespace| Api::namespaced(client.clone(), namespace))
            .collect(),
    }
}

/// Watches every Api of `apis` with `watch` and merges them.
///
/// A single Api's stream passes unchanged. Several are merged so that a reflector store fed by
/// the result stays right: the store swaps its whole content at `InitDone`, so the merged stream
/// has one `Init` ... `InitDone` (once every namespace has listed) and turns a later re-list of
/// one namespace into `Apply` events plus a `Delete` for each object of that namespace the
/// re-list no longer shows. Errors pass through as they come.
pub fn scoped_watch<K, S>(
    apis: Vec<Api<K>>,
    watch: impl Fn(Api<K>) -> S,
) -> BoxStream<'static, WatchResult<K>>
where
    K: Resource + Clone + Send + 'static,
    S: Stream<Item = WatchResult<K>> + Send + 'static,
{
    let count = apis.len();
    let mut streams: Vec<_> = apis.into_iter().map(watch).collect();
    if count == 1 {
        if let Some(single) = streams.pop() {
            return single.boxed();
        }
    }
    let tagged = stream::select_all(
        streams
            .into_iter()
            .enumerate()
            .map(|(index, stream)| stream.map(move |event| (index, event)).boxed()),
    );
    let mut merge = Merge::new(count);
    tagged
        .flat_map(move |(index, event)| stream::iter(merge.next(index, event)))
        .boxed()
}

/// The state of the merge of several namespaces' watches.
struct Merge<K> {
    /// Namespaces whose first list has not ended; the merged `InitDone` comes when none is left.
    first_lists_pending: usize,
    /// Whether the merged `Init` was sent.
    init_sent: bool,
    /// Per namespace: whether its first list ended.
    listed_once: Vec<bool>,
    /// Per namespace: names shown by the list in progress, if one is.
    listing: Vec<Option<HashSet<String>>>,
    /// Per namespace: every object as last seen, to send as a `Delete` when a re-list drops it.
    known: Vec<HashMap<String, K>>,
    /// Changes after a namespace's first list, held until every namespace has listed: sent
    /// between `Init` and `InitDone` a store would lose them at its swap.
    held: VecDeque<WatchResult<K>>,
}

impl<K: Resource + Clone> Merge<K> {
    fn new(namespaces: usize) -> Self {
        Merge {
            first_lists_pending: namespaces,
            init_sent: false,
            listed_once: vec![false; namespaces],
            listing: vec![None; namespaces],
            known: vec![HashMap::new(); namespaces],
            held: VecDeque::new(),
        }
    }

    /// What the merged stream yields for `event` of namespace `index`.
    fn next(&mut self, index: usize, event: WatchResult<K>) -> Vec<WatchResult<K>> {
        let mut out = Vec::new();
        let event = match event {
            Ok(event) => event,
            Err(error) => return vec![Err(error)],
        };
        let first = !self.listed_once[index];
        match event {
            Event::Init => {
                self.listing[index] = Some(HashSet::new());
                if !self.init_sent {
                    self.init_sent = true;
                    out.push(Ok(Event::Init));
                }
            }
            Event::InitApply(object) => {
                let name = object.name_any();
                if let Some(listing) = &mut self.listing[index] {
                    listing.insert(name.clone());
                }
                self.known[index].insert(name, object.clone());
                if first {
                    out.push(Ok(Event::InitApply(object)));
                } else {
                    self.send(&mut out, Event::Apply(object));
                }
            }
            Event::Apply(object) => {
                self.known[index].insert(object.name_any(), object.clone());
                self.send(&mut out, Event::Apply(object));
            }
            Event::Delete(object) => {
                self.known[index].remove(&object.name_any());
                self.send(&mut out, Event::Delete(object));
            }
            Event::InitDone => {
                let listed = self.listing[index].take().unwrap_or_default();
                let known = &mut self.known[index];
                let gone: Vec<String> = known
                    .keys()
                    .filter(|name| !listed.contains(*name))
                    .cloned()
                    .collect();
                let deletes: Vec<K> = gone.iter().filter_map(|name| known.remove(name)).collect();
                if first {
                    self.listed_once[index] = true;
                    self.first_lists_pending -= 1;
                }
                for object in deletes {
                    self.send(&mut out, Event::Delete(object));
                }
                if first && self.first_lists_pending == 0 {
                    out.push(Ok(Event::InitDone));
                    out.extend(self.held.drain(..));
                }
            }
        }
        out
    }

    /// Sends a change now, or holds it while a first list is still going on.
    fn send(&mut self, out: &mut Vec<WatchResult<K>>, event: Event<K>) {
        if self.first_lists_pending > 0 {
            self.held.push_back(Ok(event));
        } else {
            out.push(Ok(event));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;
    use kube::runtime::reflector::{self, ObjectRef};

    fn object(namespace: &str, name: &str, version: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                resource_version: Some(version.into()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        }
    }

    /// Feeds `events` (namespace index, event) through a merge into a reflector store and
    /// returns the store's names, sorted, and whether it is ready.
    fn store_after(namespaces: usize, events: Vec<(usize, Event<ConfigMap>)>) -> Vec<String> {
        let (reader, mut writer) = reflector::store::<ConfigMap>();
        let mut merge = Merge::new(namespaces);
        for (index, event) in events {
            for merged in merge.next(index, Ok(event)) {
                writer.apply_watcher_event(&merged.unwrap());
            }
        }
        let mut names: Vec<String> = reader
            .state()
            .iter()
            .map(|o| format!("{}/{}", o.namespace().unwrap(), o.name_any()))
            .collect();
        names.sort();
        names
    }

    fn first_lists() -> Vec<(usize, Event<ConfigMap>)> {
        vec![
            (0, Event::Init),
            (1, Event::Init),
            (0, Event::InitApply(object("a", "one", "1"))),
            (1, Event::InitApply(object("b", "two", "1"))),
            (0, Event::InitDone),
            (1, Event::InitDone),
        ]
    }

    #[test]
    fn one_init_and_one_init_done_once_every_namespace_listed() {
        let mut merge = Merge::<ConfigMap>::new(2);
        let kinds: Vec<&str> = first_lists()
            .into_iter()
            .flat_map(|(index, event)| merge.next(index, Ok(event)))
            .map(|event| match event.unwrap() {
                Event::Init => "Init",
                Event::InitApply(_) => "InitApply",
                Event::InitDone => "InitDone",
                Event::Apply(_) => "Apply",
                Event::Delete(_) => "Delete",
            })
            .collect();
        assert_eq!(kinds, ["Init", "InitApply", "InitApply", "InitDone"]);
        assert_eq!(store_after(2, first_lists()), ["a/one", "b/two"]);
    }

    #[test]
    fn a_change_during_another_namespaces_first_list_survives_the_stores_swap() {
        let events = vec![
            (0, Event::Init),
            (1, Event::Init),
            (0, Event::InitApply(object("a", "one", "1"))),
            (0, Event::InitDone),
            (0, Event::Apply(object("a", "new", "2"))),
            (0, Event::Delete(object("a", "one", "1"))),
            (1, Event::InitApply(object("b", "two", "1"))),
            (1, Event::InitDone),
        ];
        assert_eq!(store_after(2, events), ["a/new", "b/two"]);
    }

    #[test]
    fn a_relist_of_one_namespace_drops_only_its_own_vanished_objects() {
        let mut events = first_lists();
        events.extend([
            (0, Event::Apply(object("a", "three", "2"))),
            // Namespace a's watch broke and lists again: "one" went meanwhile.
            (0, Event::Init),
            (0, Event::InitApply(object("a", "three", "2"))),
            (0, Event::InitDone),
        ]);
        assert_eq!(store_after(2, events), ["a/three", "b/two"]);
    }

    #[test]
    fn a_relist_sends_deletes_not_a_second_init() {
        let mut merge = Merge::<ConfigMap>::new(2);
        for (index, event) in first_lists() {
            merge.next(index, Ok(event));
        }
        assert!(merge.next(1, Ok(Event::Init)).is_empty());
        let done = merge.next(1, Ok(Event::InitDone));
        assert_eq!(done.len(), 1);
        match &done[0] {
            Ok(Event::Delete(gone)) => {
                assert_eq!(ObjectRef::from_obj(gone), ObjectRef::new("two").within("b"))
            }
            other => panic!("expected the delete of b/two, got {other:?}"),
        }
    }
}
