//! Stores and the store-geo index (W1, W2).
//!
//! Stores are partitioned by a geographic cell (1° of latitude by 1° of longitude); each cell
//! belongs to one shard, and each shard keeps the stores of its cells in an R-tree (the
//! `rstar` crate). Points live in the R-tree as unit vectors on the sphere, not as latitude
//! and longitude: the straight-line (chord) distance between two unit vectors grows with the
//! great-circle distance, so the R-tree's nearest neighbour *is* the great-circle nearest
//! store, with no seam at the antimeridian and no singularity at the poles.
//!
//! A nearest-store query asks only the shards owning the cells that the search disk touches
//! ([`covering_cells`]); each answers its nearest candidates and the engine keeps the closest.

use rstar::primitives::GeomWithData;
use rstar::RTree;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::cow::{CowMap, Frozen, CHUNK_BITS_LARGE};
use crate::emvqr;
use crate::limits::{
    ACCEPTED_METHODS_MAX, BEACON_ID_LEN_MAX, STORE_ADDRESS_LEN_MAX, STORE_IDS_PER_KIND_MAX,
    STORE_NAME_LEN_MAX, STORE_TEXT_LEN_MAX,
};
use crate::types::{MeansKind, ReasonCode};

/// Mean Earth radius (IUGG), metres.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;
/// Size of a partition cell, degrees.
const CELL_DEG: f64 = 1.0;
/// Longitude columns of cells.
const CELL_COLUMNS: u32 = 360;

/// A settlement method a store accepts: a means kind and, optionally, a brand (`suica`,
/// `paypay`, `visa`); an empty brand accepts every means of the kind.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct AcceptedMethod {
    /// The means kind.
    #[rkyv(with = crate::shard::archive::Via<u8>)]
    pub kind: MeansKind,
    /// The brand, compared case-insensitively with a means' label; empty for any.
    pub brand: String,
}

impl AcceptedMethod {
    /// Whether a means of `kind` labelled `label` is accepted.
    pub fn accepts(&self, kind: MeansKind, label: &str) -> bool {
        self.kind == kind && (self.brand.is_empty() || label_has_brand(label, &self.brand))
    }
}

/// Whether a means label names `brand` (case-insensitive, as a word of the label).
fn label_has_brand(label: &str, brand: &str) -> bool {
    label.split(|c: char| !c.is_ascii_alphanumeric()).any(|word| word.eq_ignore_ascii_case(brand))
}

/// A store (W1).
#[derive(
    Debug,
    Clone,
    PartialEq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct Store {
    /// Store ID (1..=32 printable ASCII).
    pub store_id: String,
    /// Display name.
    pub name: String,
    /// Industry (free text, e.g. `convenience`, or an ISO 18245 merchant category code).
    pub industry: String,
    /// Postal address.
    pub address: String,
    /// Latitude, degrees, -90..=90.
    pub latitude: f64,
    /// Longitude, degrees, -180..=180.
    pub longitude: f64,
    /// Beacon IDs the store broadcasts (e.g. iBeacon `UUID:major:minor`).
    pub beacons: Vec<String>,
    /// Wi-Fi IDs (BSSIDs) the store broadcasts.
    pub wifi: Vec<String>,
    /// The payload of the QR poster in the store: a plain poster code or an EMVCo
    /// merchant-presented payload (its CRC is checked).
    pub qr_code: Option<String>,
    /// Settlement methods accepted.
    pub accepts: Vec<AcceptedMethod>,
}

fn text_ok(text: &str, max: usize) -> bool {
    text.len() <= max && !text.chars().any(char::is_control)
}

fn id_ok(id: &str, max: usize) -> bool {
    !id.is_empty() && id.len() <= max && id.bytes().all(|b| b.is_ascii_graphic())
}

impl Store {
    /// Checks every field against its limits.
    pub fn validate(&self) -> Result<(), ReasonCode> {
        let bad = Err(ReasonCode::InvalidStore);
        if !id_ok(&self.store_id, STORE_TEXT_LEN_MAX)
            || self.name.is_empty()
            || !text_ok(&self.name, STORE_NAME_LEN_MAX)
            || !text_ok(&self.industry, STORE_TEXT_LEN_MAX)
            || !text_ok(&self.address, STORE_ADDRESS_LEN_MAX)
        {
            return bad;
        }
        let lat_ok = self.latitude.is_finite() && (-90.0..=90.0).contains(&self.latitude);
        let lon_ok = self.longitude.is_finite() && (-180.0..=180.0).contains(&self.longitude);
        if !lat_ok || !lon_ok {
            return bad;
        }
        for ids in [&self.beacons, &self.wifi] {
            if ids.len() > STORE_IDS_PER_KIND_MAX
                || !ids.iter().all(|id| id_ok(id, BEACON_ID_LEN_MAX))
            {
                return bad;
            }
        }
        if let Some(code) = &self.qr_code {
            if emvqr::is_mpm(code) {
                emvqr::parse(code).map_err(|_| ReasonCode::InvalidQrCode)?;
            } else if !id_ok(code, emvqr::PAYLOAD_LEN_MAX) {
                return bad;
            }
        }
        let accepts_ok = self.accepts.len() <= ACCEPTED_METHODS_MAX
            && self.accepts.iter().all(|a| text_ok(&a.brand, STORE_TEXT_LEN_MAX));
        if !accepts_ok {
            return bad;
        }
        Ok(())
    }

    /// The partition cell of the store's position.
    pub fn cell(&self) -> u32 {
        cell_of(self.latitude, self.longitude)
    }

    /// The store's position as a unit vector.
    pub fn position(&self) -> [f64; 3] {
        unit_vector(self.latitude, self.longitude)
    }
}

/// A point on the unit sphere for a latitude and longitude in degrees.
pub fn unit_vector(latitude: f64, longitude: f64) -> [f64; 3] {
    let (lat, lon) = (latitude.to_radians(), longitude.to_radians());
    [lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()]
}

/// The great-circle distance, metres, for a chord between two unit vectors.
pub fn chord_to_metres(chord: f64) -> f64 {
    2.0 * EARTH_RADIUS_M * (chord / 2.0).min(1.0).asin()
}

/// The chord between two unit vectors `metres` apart along a great circle.
pub fn metres_to_chord(metres: f64) -> f64 {
    let angle = (metres / EARTH_RADIUS_M).min(std::f64::consts::PI);
    2.0 * (angle / 2.0).sin()
}

/// The great-circle distance in metres between two points in degrees (haversine).
pub fn great_circle_m(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (lat1, lat2) = (a.0.to_radians(), b.0.to_radians());
    let d_lat = lat2 - lat1;
    let d_lon = (b.1 - a.1).to_radians();
    let h = (d_lat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (d_lon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
}

/// The partition cell holding a point: 1° rows from the south pole, 1° columns from the
/// antimeridian (longitude 180 is -180).
pub fn cell_of(latitude: f64, longitude: f64) -> u32 {
    let row = ((latitude + 90.0) / CELL_DEG).floor().clamp(0.0, 179.0) as u32;
    let column = ((longitude + 180.0) / CELL_DEG).floor().rem_euclid(360.0) as u32;
    row * CELL_COLUMNS + column
}

/// Every cell that a disk of `radius_m` around the point touches, correct across the
/// antimeridian and near the poles (a disk holding a pole touches its whole polar band).
pub fn covering_cells(latitude: f64, longitude: f64, radius_m: f64) -> Vec<u32> {
    const MARGIN_DEG: f64 = 1e-9;
    let angle = radius_m / EARTH_RADIUS_M;
    let angle_deg = angle.to_degrees();
    let (south, north) = (latitude - angle_deg - MARGIN_DEG, latitude + angle_deg + MARGIN_DEG);
    let first_row = ((south + 90.0) / CELL_DEG).floor().clamp(0.0, 179.0) as u32;
    let last_row = ((north + 90.0) / CELL_DEG).floor().clamp(0.0, 179.0) as u32;
    let holds_pole = north >= 90.0 || south <= -90.0;
    let half_width_deg = if holds_pole {
        180.0
    } else {
        let ratio = angle.sin() / latitude.to_radians().cos();
        if ratio >= 1.0 {
            180.0
        } else {
            ratio.asin().to_degrees() + MARGIN_DEG
        }
    };
    let columns: Vec<u32> = if half_width_deg >= 180.0 {
        (0..CELL_COLUMNS).collect()
    } else {
        let west = ((longitude - half_width_deg + 180.0) / CELL_DEG).floor() as i64;
        let east = ((longitude + half_width_deg + 180.0) / CELL_DEG).floor() as i64;
        (west..=east).map(|c| c.rem_euclid(i64::from(CELL_COLUMNS)) as u32).collect()
    };
    let mut cells = Vec::with_capacity(columns.len() * (last_row - first_row + 1) as usize);
    for row in first_row..=last_row {
        cells.extend(columns.iter().map(|column| row * CELL_COLUMNS + column));
    }
    cells.sort_unstable();
    cells.dedup();
    cells
}

/// A store's entry in the R-tree: its unit vector and its ID.
type Entry = GeomWithData<[f64; 3], Box<str>>;

/// One shard's stores: the records (with the engine time of their last change) and their
/// R-tree. A snapshot takes the records (a [`CowMap`]) and rebuilds the tree on restore.
pub struct StoreIndex {
    tree: RTree<Entry>,
    stores: CowMap<String, (Store, i64)>,
}

impl Default for StoreIndex {
    fn default() -> StoreIndex {
        StoreIndex { tree: RTree::new(), stores: CowMap::new(CHUNK_BITS_LARGE) }
    }
}

/// A nearest-store candidate: the store, and the chord to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The store.
    pub store: Store,
    /// Straight-line distance between the unit vectors.
    pub chord: f64,
}

impl StoreIndex {
    /// Adds or replaces a store (validated already), changed at `updated_ms`.
    pub fn upsert(&mut self, store: Store, updated_ms: i64) {
        self.remove(&store.store_id);
        self.tree.insert(GeomWithData::new(store.position(), store.store_id.clone().into()));
        self.stores.insert(store.store_id.clone(), (store, updated_ms));
    }

    /// Removes a store; returns it if it was here.
    pub fn remove(&mut self, store_id: &str) -> Option<Store> {
        let (store, _) = self.stores.remove(store_id)?;
        let entry = GeomWithData::new(store.position(), store.store_id.clone().into());
        self.tree.remove(&entry);
        Some(store)
    }

    /// A store by ID.
    pub fn get(&self, store_id: &str) -> Option<&Store> {
        self.stores.get(store_id).map(|(store, _)| store)
    }

    /// Stores held.
    pub fn len(&self) -> usize {
        self.stores.len()
    }

    /// Whether no store is held.
    pub fn is_empty(&self) -> bool {
        self.stores.is_empty()
    }

    /// Every store with the time of its last change.
    pub fn stores(&self) -> impl Iterator<Item = (&Store, i64)> {
        self.stores.values().map(|(store, at)| (store, *at))
    }

    /// Every store with the time of its last change, frozen for a snapshot.
    pub fn freeze(&mut self) -> Frozen<String, (Store, i64)> {
        self.stores.freeze()
    }

    /// The nearest stores within `max_chord` of `position`: every store at the smallest
    /// distance (several when tied), or none.
    pub fn nearest(&self, position: [f64; 3], max_chord: f64) -> Vec<Candidate> {
        nearest_in(&self.tree, position, max_chord)
            .into_iter()
            .filter_map(|(id, chord)| Some(Candidate { store: self.get(id)?.clone(), chord }))
            .collect()
    }
}

/// What identifies a store to a device in it (W2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Signal {
    /// A beacon ID.
    Beacon = 1,
    /// A Wi-Fi ID (BSSID).
    Wifi = 2,
    /// The QR poster's payload.
    QrPoster = 3,
}

impl Signal {
    /// From the wire byte.
    pub fn from_u8(byte: u8) -> Option<Signal> {
        match byte {
            1 => Some(Signal::Beacon),
            2 => Some(Signal::Wifi),
            3 => Some(Signal::QrPoster),
            _ => None,
        }
    }
}

fn signals(store: &Store) -> Vec<(Signal, String)> {
    let beacons = store.beacons.iter().map(|b| (Signal::Beacon, b.clone()));
    let wifi = store.wifi.iter().map(|w| (Signal::Wifi, w.clone()));
    let qr = store.qr_code.iter().map(|q| (Signal::QrPoster, q.clone()));
    beacons.chain(wifi).chain(qr).collect()
}

struct DirectoryEntry {
    cell: u32,
    updated_ms: i64,
    signals: Vec<(Signal, String)>,
}

#[derive(Default)]
struct DirectoryInner {
    stores: FxHashMap<String, DirectoryEntry>,
    signals: FxHashMap<(Signal, String), String>,
}

/// Where each store lives (its cell) and which store each beacon, Wi-Fi ID and QR poster
/// names. Written by shards as they apply store commands, read by the engine from any
/// thread; rebuilt from the shards' records at recovery, so it needs no log of its own.
#[derive(Default)]
pub struct StoreDirectory {
    inner: std::sync::RwLock<DirectoryInner>,
}

impl StoreDirectory {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, DirectoryInner> {
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, DirectoryInner> {
        self.inner.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether every signal of `store` is free or already its own.
    pub fn signals_free(&self, store: &Store) -> bool {
        let inner = self.read();
        signals(store)
            .iter()
            .all(|key| inner.signals.get(key).is_none_or(|id| *id == store.store_id))
    }

    /// Records `store` at its cell: releases the signals its previous version had and claims
    /// its current ones. Call after [`signals_free`](Self::signals_free).
    pub fn set(&self, store: &Store, updated_ms: i64) {
        let mut inner = self.write();
        let current = signals(store);
        if let Some(old) = inner.stores.remove(&store.store_id) {
            for key in old.signals {
                if inner.signals.get(&key) == Some(&store.store_id) {
                    inner.signals.remove(&key);
                }
            }
        }
        for key in &current {
            inner.signals.insert(key.clone(), store.store_id.clone());
        }
        let entry = DirectoryEntry { cell: store.cell(), updated_ms, signals: current };
        inner.stores.insert(store.store_id.clone(), entry);
    }

    /// Forgets a store and releases its signals.
    pub fn remove(&self, store_id: &str) {
        let mut inner = self.write();
        if let Some(old) = inner.stores.remove(store_id) {
            for key in old.signals {
                inner.signals.remove(&key);
            }
        }
    }

    /// The cell and last-change time of a store.
    pub fn locate(&self, store_id: &str) -> Option<(u32, i64)> {
        self.read().stores.get(store_id).map(|e| (e.cell, e.updated_ms))
    }

    /// The store a signal names, with its cell.
    pub fn resolve(&self, signal: Signal, id: &str) -> Option<(String, u32)> {
        let inner = self.read();
        let store_id = inner.signals.get(&(signal, id.to_owned()))?;
        let cell = inner.stores.get(store_id)?.cell;
        Some((store_id.clone(), cell))
    }

    /// Empties the directory (before a rebuild).
    pub fn clear(&self) {
        *self.write() = DirectoryInner::default();
    }

    /// Stores known.
    pub fn len(&self) -> usize {
        self.read().stores.len()
    }

    /// Whether no store is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Rebuilds `directory` from every shard's stores. A store found in two shards (a move whose
/// removal from the old cell's shard was cut off by a crash) is kept where it changed last and
/// dropped from the other shard.
pub fn rebuild_directory(directory: &StoreDirectory, shards: &mut [&mut StoreIndex]) {
    directory.clear();
    let mut owner: FxHashMap<String, (usize, i64)> = FxHashMap::default();
    let mut stale: Vec<(usize, String)> = Vec::new();
    for (shard, index) in shards.iter().enumerate() {
        for (store, updated_ms) in index.stores() {
            match owner.get(&store.store_id) {
                Some((_, at)) if *at >= updated_ms => stale.push((shard, store.store_id.clone())),
                previous => {
                    if let Some((other, _)) = previous {
                        stale.push((*other, store.store_id.clone()));
                    }
                    owner.insert(store.store_id.clone(), (shard, updated_ms));
                }
            }
        }
    }
    for (shard, store_id) in stale {
        shards[shard].remove(&store_id);
    }
    for index in shards.iter() {
        for (store, updated_ms) in index.stores() {
            directory.set(store, updated_ms);
        }
    }
}

/// The IDs and chords of the entries nearest to `position` within `max_chord`: the nearest,
/// and any within about 2 mm of it (candidate ties).
pub fn nearest_in(
    tree: &RTree<GeomWithData<[f64; 3], Box<str>>>,
    position: [f64; 3],
    max_chord: f64,
) -> Vec<(&str, f64)> {
    let max_d2 = max_chord * max_chord;
    let mut found = Vec::new();
    let mut limit = None;
    for (entry, d2) in tree.nearest_neighbor_iter_with_distance_2(&position) {
        let chord = d2.sqrt();
        if d2 > max_d2 || limit.is_some_and(|limit| chord > limit) {
            break;
        }
        // Everything within a few millimetres of the nearest comes along: the caller decides
        // ties at the millimetre, as the distance is reported.
        limit.get_or_insert(chord + TIE_CHORD);
        found.push((&*entry.data, chord));
    }
    found
}

/// The chord of about 2 mm on the Earth's surface.
const TIE_CHORD: f64 = 2e-3 / EARTH_RADIUS_M;

/// Builds an R-tree of `(id, latitude, longitude)` at once (bulk loading), as the benchmark
/// and a large recovery do.
pub fn bulk_tree(points: impl IntoIterator<Item = (String, f64, f64)>) -> RTree<Entry> {
    let entries = points
        .into_iter()
        .map(|(id, lat, lon)| GeomWithData::new(unit_vector(lat, lon), id.into_boxed_str()))
        .collect();
    RTree::bulk_load(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(id: &str, lat: f64, lon: f64) -> Store {
        Store {
            store_id: id.into(),
            name: id.into(),
            industry: String::new(),
            address: String::new(),
            latitude: lat,
            longitude: lon,
            beacons: Vec::new(),
            wifi: Vec::new(),
            qr_code: None,
            accepts: Vec::new(),
        }
    }

    #[test]
    fn distances_agree_with_haversine() {
        // Tokyo station to Shinjuku station, about 6.1 km.
        let (a, b) = ((35.6812, 139.7671), (35.6896, 139.7006));
        let chord = {
            let (u, v) = (unit_vector(a.0, a.1), unit_vector(b.0, b.1));
            ((u[0] - v[0]).powi(2) + (u[1] - v[1]).powi(2) + (u[2] - v[2]).powi(2)).sqrt()
        };
        let haversine = great_circle_m(a, b);
        assert!((chord_to_metres(chord) - haversine).abs() < 0.01);
        assert!((6_000.0..6_200.0).contains(&haversine), "{haversine}");
        assert!((metres_to_chord(haversine) - chord).abs() < 1e-12);
    }

    #[test]
    fn nearest_across_the_antimeridian_and_at_the_pole() {
        let mut index = StoreIndex::default();
        index.upsert(store("FIJI-EAST", -17.0, 179.999), 0);
        index.upsert(store("FIJI-FAR", -17.0, 179.9), 0);
        index.upsert(store("POLE", 89.9999, 0.0), 0);
        // From just west of the antimeridian's other side, the store 200 m away wins.
        let found = index.nearest(unit_vector(-17.0, -179.9995), metres_to_chord(1_000.0));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].store.store_id, "FIJI-EAST");
        let metres = chord_to_metres(found[0].chord);
        assert!((100.0..200.0).contains(&metres), "{metres}");
        // Near the pole every longitude is close.
        let found = index.nearest(unit_vector(89.9995, 170.0), metres_to_chord(500.0));
        assert_eq!(found[0].store.store_id, "POLE");
    }

    #[test]
    fn ties_are_all_reported_and_nothing_beyond_the_radius() {
        let mut index = StoreIndex::default();
        index.upsert(store("NORTH", 0.001, 0.0), 0);
        index.upsert(store("SOUTH", -0.001, 0.0), 0);
        index.upsert(store("FAR", 0.01, 0.0), 0);
        let found = index.nearest(unit_vector(0.0, 0.0), metres_to_chord(500.0));
        let mut ids: Vec<&str> = found.iter().map(|c| c.store.store_id.as_str()).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec!["NORTH", "SOUTH"]);
        assert!(index.nearest(unit_vector(1.0, 1.0), metres_to_chord(500.0)).is_empty());
        // Moving and removing keep the tree and the records in step.
        index.upsert(store("NORTH", 0.0005, 0.0), 0);
        let found = index.nearest(unit_vector(0.0, 0.0), metres_to_chord(500.0));
        assert_eq!(found[0].store.store_id, "NORTH");
        assert!(index.remove("NORTH").is_some());
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn covering_cells_wrap_and_widen() {
        // Near the antimeridian: both sides.
        let cells = covering_cells(-17.0, 179.9995, 1_000.0);
        assert!(cells.contains(&cell_of(-17.0, 179.9995)));
        assert!(cells.contains(&cell_of(-17.0, -179.9995)));
        // A point 10 m from the pole covers its whole band.
        let cells = covering_cells(89.9999, 0.0, 50.0);
        assert_eq!(cells.len(), 360);
        // Mid-latitude, small disk inside one cell.
        assert_eq!(covering_cells(35.5, 139.5, 100.0), vec![cell_of(35.5, 139.5)]);
        // Every store within the radius lies in a covering cell (spot check on a ring).
        for bearing in 0..36 {
            let (lat, lon): (f64, f64) = (59.99, 10.0);
            let b = f64::from(bearing * 10).to_radians();
            let d = 40_000.0 / EARTH_RADIUS_M;
            let lat2 = (lat.to_radians().sin() * d.cos()
                + lat.to_radians().cos() * d.sin() * b.cos())
            .asin();
            let lon2 = lon.to_radians()
                + (b.sin() * d.sin() * lat.to_radians().cos())
                    .atan2(d.cos() - lat.to_radians().sin() * lat2.sin());
            let cell = cell_of(lat2.to_degrees(), lon2.to_degrees());
            assert!(covering_cells(lat, lon, 40_001.0).contains(&cell), "bearing {bearing}");
        }
    }

    #[test]
    fn brands_match_words_of_the_label() {
        let suica = AcceptedMethod { kind: MeansKind::EMoney, brand: "suica".into() };
        assert!(suica.accepts(MeansKind::EMoney, "Suica"));
        assert!(suica.accepts(MeansKind::EMoney, "Mobile Suica (JR East)"));
        assert!(!suica.accepts(MeansKind::EMoney, "nanaco"));
        assert!(!suica.accepts(MeansKind::CreditCard, "Suica"));
        let any_card = AcceptedMethod { kind: MeansKind::CreditCard, brand: String::new() };
        assert!(any_card.accepts(MeansKind::CreditCard, "VISA ****1111"));
    }
}
