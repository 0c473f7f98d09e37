//! Phones that move between users of one account in one cycle: two users swapping, three
//! rotating, a hire taking the phone of a user who left. Wazzup refuses a phone another user
//! holds (`USER_ALREADY_EXISTS`), and may check a request user by user, so such moves are sent
//! in an order that lands them either way. Pure: the users stage sends what this decides.
//!
//! A user whose new phone another user holds, where that other user changes its phone this
//! cycle, is a *taker*: it is sent first without a phone, then every other user goes, then the
//! takers get their phones. A user who left the CRM and holds a phone someone takes is sent
//! without it first (its deletion comes after the settings).

use std::collections::{HashMap, HashSet};

use crate::domain::{CrmText, UserPayload, ValidUser, user_hash};

/// What Wazzup holds, as the mirror knows it: each phone's user, and the names of the users
/// Wazzup holds that the CRM no longer returns.
#[derive(Debug, Default)]
pub struct PhoneBook {
    pub holder: HashMap<CrmText, CrmText>,
    pub leaver_name: HashMap<CrmText, CrmText>,
}

/// The users stage's sends, in three rounds.
#[derive(Debug, Default)]
pub struct PhoneMoves<'u> {
    /// First, without their phone: the takers, and leavers holding a phone that is taken.
    pub release: Vec<ValidUser>,
    /// Then every due user that is not a taker.
    pub main: Vec<&'u ValidUser>,
    /// Last, with their phone: the takers.
    pub restore: Vec<&'u ValidUser>,
}

/// Orders the due users (`leaving`: the users deleted this cycle).
pub fn order<'u>(
    due: Vec<&'u ValidUser>,
    book: &PhoneBook,
    leaving: &HashSet<&str>,
) -> PhoneMoves<'u> {
    let new_phone: HashMap<&str, Option<&str>> = due
        .iter()
        .map(|u| (u.payload.id.as_str(), u.payload.phone.as_deref()))
        .collect();
    let mut takers: HashSet<&str> = HashSet::new();
    let mut released_leavers: Vec<&str> = Vec::new();
    for u in &due {
        let Some(phone) = u.payload.phone.as_deref() else {
            continue;
        };
        let Some(holder) = book.holder.get(phone).map(CrmText::as_str) else {
            continue;
        };
        if holder == u.payload.id.as_str() {
            continue;
        }
        match new_phone.get(holder) {
            // The holder moves to another phone (or none) this cycle.
            Some(theirs) if *theirs != Some(phone) => {
                takers.insert(u.payload.id.as_str());
            }
            Some(_) => {}
            None if leaving.contains(holder) && !released_leavers.contains(&holder) => {
                released_leavers.push(holder);
            }
            None => {}
        }
    }
    let mut moves = PhoneMoves::default();
    for u in due {
        if takers.contains(u.payload.id.as_str()) {
            moves
                .release
                .push(without_phone(&u.payload.name, u, u.hide_phone));
            moves.restore.push(u);
        } else {
            moves.main.push(u);
        }
    }
    for id in released_leavers {
        if let Some(name) = book.leaver_name.get(id) {
            let payload = UserPayload {
                id: id.into(),
                name: name.clone(),
                phone: None,
            };
            moves.release.push(phoneless(payload, false));
        }
    }
    moves
}

/// The user as it is sent in the first round: the same, without its phone.
fn without_phone(name: &CrmText, u: &ValidUser, hide_phone: bool) -> ValidUser {
    let payload = UserPayload {
        id: u.payload.id.clone(),
        name: name.clone(),
        phone: None,
    };
    phoneless(payload, hide_phone)
}

/// A user sent without a phone for a moment. Its CRM row is not recorded with it, so that if
/// the cycle stops here, the next one sends the user as the CRM has it.
fn phoneless(payload: UserPayload, hide_phone: bool) -> ValidUser {
    ValidUser {
        hash: user_hash(&payload),
        payload,
        hide_phone,
        phone_source: None,
        phone_valid: false,
        unreadable_phone: None,
        source_hash: None,
        row_remembered: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str, phone: Option<&str>) -> ValidUser {
        let payload = UserPayload {
            id: id.into(),
            name: format!("User {id}").into(),
            phone: phone.map(Into::into),
        };
        ValidUser {
            hash: user_hash(&payload),
            payload,
            hide_phone: false,
            phone_source: None,
            phone_valid: true,
            unreadable_phone: None,
            source_hash: None,
            row_remembered: false,
        }
    }

    fn book(holders: &[(&str, &str)], leavers: &[(&str, &str)]) -> PhoneBook {
        PhoneBook {
            holder: holders
                .iter()
                .map(|(p, id)| ((*p).into(), (*id).into()))
                .collect(),
            leaver_name: leavers
                .iter()
                .map(|(id, n)| ((*id).into(), (*n).into()))
                .collect(),
        }
    }

    fn ids<'a>(users: impl IntoIterator<Item = &'a ValidUser>) -> Vec<String> {
        let mut v: Vec<String> = users
            .into_iter()
            .map(|u| u.payload.id.to_string())
            .collect();
        v.sort();
        v
    }

    /// Applies the rounds to `held` user by user, as a strict Wazzup would, and fails on a
    /// phone another user holds at that moment.
    fn apply_user_by_user(moves: &PhoneMoves<'_>, held: &mut HashMap<String, String>) {
        let rounds: Vec<Vec<&ValidUser>> = vec![
            moves.release.iter().collect(),
            moves.main.clone(),
            moves.restore.clone(),
        ];
        for round in rounds {
            for u in round {
                held.retain(|_, id| *id != u.payload.id.as_str());
                if let Some(p) = &u.payload.phone {
                    assert!(
                        !held.contains_key(p.as_str()),
                        "{} would take {p}, still held by {}",
                        u.payload.id,
                        held[p.as_str()]
                    );
                    held.insert(p.to_string(), u.payload.id.to_string());
                }
            }
        }
    }

    #[test]
    fn two_users_swapping_phones_go_without_phones_first_then_get_them() {
        let (a, b) = (user("a", Some("111")), user("b", Some("222")));
        let book = book(&[("222", "a"), ("111", "b")], &[]);
        let moves = order(vec![&a, &b], &book, &HashSet::new());
        assert_eq!(ids(&moves.release), ["a", "b"]);
        assert!(moves.release.iter().all(|u| u.payload.phone.is_none()));
        assert!(moves.main.is_empty());
        assert_eq!(ids(moves.restore.iter().copied()), ["a", "b"]);
        let mut held = HashMap::from([
            ("222".to_string(), "a".to_string()),
            ("111".to_string(), "b".to_string()),
        ]);
        apply_user_by_user(&moves, &mut held);
    }

    #[test]
    fn a_rotation_of_three_and_a_chain_land_user_by_user() {
        // c → a's old phone, a → b's, b → c's; d takes e's phone while e moves to a new one.
        let users = [
            user("a", Some("2")),
            user("b", Some("3")),
            user("c", Some("1")),
            user("d", Some("5")),
            user("e", Some("6")),
        ];
        let book = book(
            &[("1", "a"), ("2", "b"), ("3", "c"), ("4", "d"), ("5", "e")],
            &[],
        );
        let moves = order(users.iter().collect(), &book, &HashSet::new());
        assert_eq!(ids(&moves.release), ["a", "b", "c", "d"]);
        assert_eq!(ids(moves.main.iter().copied()), ["e"]);
        let mut held: HashMap<String, String> = ["1a", "2b", "3c", "4d", "5e"]
            .iter()
            .map(|s| (s[..1].to_string(), s[1..].to_string()))
            .collect();
        apply_user_by_user(&moves, &mut held);
        assert_eq!(held["1"], "c");
        assert_eq!(held["5"], "d");
    }

    #[test]
    fn a_leaver_holding_a_taken_phone_is_sent_without_it_first() {
        let hire = user("new", Some("777"));
        let book = book(&[("777", "gone")], &[("gone", "Old Name")]);
        let leaving = HashSet::from(["gone"]);
        let moves = order(vec![&hire], &book, &leaving);
        assert_eq!(ids(&moves.release), ["gone"]);
        assert_eq!(moves.release[0].payload.name, "Old Name");
        assert_eq!(moves.release[0].payload.phone, None);
        assert_eq!(ids(moves.main.iter().copied()), ["new"]);
        assert!(moves.restore.is_empty());
        let mut held = HashMap::from([("777".to_string(), "gone".to_string())]);
        apply_user_by_user(&moves, &mut held);
    }

    #[test]
    fn users_whose_phones_are_free_or_their_own_go_in_one_round() {
        let (a, b) = (user("a", Some("1")), user("b", Some("9")));
        // a keeps its phone; b's new phone is held by someone who keeps it (a duplicate the
        // daemon cannot resolve: Wazzup refuses it, and it becomes a dead letter).
        let book = book(&[("1", "a"), ("9", "x")], &[]);
        let moves = order(vec![&a, &b], &book, &HashSet::new());
        assert!(moves.release.is_empty() && moves.restore.is_empty());
        assert_eq!(ids(moves.main.iter().copied()), ["a", "b"]);
    }
}
