//! The register of a connector's links: which server they go to now, and every link it made,
//! each in a place that every handle on it names. Pure bookkeeping, generic over the link, so
//! what a switch of master does to the links is tested without a network.

use std::time::Duration;

/// A Redis server's address.
pub(super) type Server = (String, u16);

/// The server the links go to (the master under Sentinel; none in a cluster, or before the
/// sentinels were first asked) and the links, each with the response timeout it was made
/// with; `None` where the last handle on a link was dropped (a place the next link takes).
/// Places are never removed, so the index a handle holds stays its own.
pub(super) struct Links<L> {
    server: Option<Server>,
    places: Vec<(Duration, Option<L>)>,
}

impl<L: Clone> Links<L> {
    /// No links yet, going to `server`.
    pub(super) fn new(server: Option<Server>) -> Links<L> {
        Links {
            server,
            places: Vec::new(),
        }
    }

    /// The server the links go to.
    pub(super) fn server(&self) -> Option<&Server> {
        self.server.as_ref()
    }

    /// Sets the server new links go to, without touching the open ones (the first master the
    /// sentinels named, before any link was made).
    pub(super) fn set_server(&mut self, server: Server) {
        self.server = Some(server);
    }

    /// The link at `index`, if it is still open.
    pub(super) fn get(&self, index: usize) -> Option<L> {
        match self.places.get(index) {
            Some((_, Some(link))) => Some(link.clone()),
            _ => None,
        }
    }

    /// Puts `link` in the first free place (or a new one) and returns the place.
    pub(super) fn add(&mut self, timeout: Duration, link: L) -> usize {
        let link = (timeout, Some(link));
        match self.places.iter().position(|(_, link)| link.is_none()) {
            Some(free) => {
                self.places[free] = link;
                free
            }
            None => {
                self.places.push(link);
                self.places.len() - 1
            }
        }
    }

    /// Takes the link at `index` out (its last handle went), for the caller to close after
    /// letting go of the register.
    pub(super) fn close(&mut self, index: usize) -> Option<L> {
        self.places.get_mut(index).and_then(|(_, link)| link.take())
    }

    /// The open places with the response timeout of each: what a switch must replace.
    pub(super) fn open(&self) -> Vec<(usize, Duration)> {
        self.places
            .iter()
            .enumerate()
            .filter(|(_, (_, link))| link.is_some())
            .map(|(i, (timeout, _))| (i, *timeout))
            .collect()
    }

    /// Moves to `server`: each of `links` replaces the link in its place, unless that place was
    /// closed meanwhile (its last handle went: it stays closed).
    pub(super) fn switch(&mut self, server: Option<Server>, links: Vec<(usize, L)>) {
        self.server = server;
        for (index, link) in links {
            if let Some((_, place @ Some(_))) = self.places.get_mut(index) {
                *place = Some(link);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(port: u16) -> Server {
        ("redis".to_string(), port)
    }

    #[test]
    fn a_closed_place_is_taken_by_the_next_link_and_the_others_keep_theirs() {
        let mut links = Links::new(Some(server(1)));
        let t = Duration::from_secs(1);
        assert_eq!((links.add(t, "a"), links.add(t, "b"), links.add(t, "c")), (0, 1, 2));
        assert_eq!(links.close(1), Some("b"));
        assert_eq!(links.close(1), None, "closed twice");
        assert_eq!(links.get(1), None);
        assert_eq!(links.add(t, "d"), 1);
        assert_eq!(
            [links.get(0), links.get(1), links.get(2)],
            [Some("a"), Some("d"), Some("c")]
        );
        assert_eq!(links.get(3), None);
    }

    #[test]
    fn a_switch_moves_every_open_link_and_leaves_a_place_closed_meanwhile_closed() {
        let mut links = Links::new(None);
        links.set_server(server(1));
        let (fast, slow) = (Duration::from_secs(1), Duration::from_secs(10));
        links.add(fast, "old-0");
        links.add(slow, "old-1");
        links.add(fast, "old-2");
        links.close(2);
        // The replacements are made for the places open when the switch began...
        let open = links.open();
        assert_eq!(open, [(0, fast), (1, slow)]);
        // ...and one of them loses its last handle while they are being made.
        links.close(1);
        links.switch(Some(server(2)), vec![(0, "new-0"), (1, "new-1")]);
        assert_eq!(links.server(), Some(&server(2)));
        assert_eq!([links.get(0), links.get(1), links.get(2)], [Some("new-0"), None, None]);
    }
}
