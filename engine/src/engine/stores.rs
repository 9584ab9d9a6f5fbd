//! W1–W2 stores: register, update, move and remove stores, and find the store a device is in.

use super::*;

/// The store a device is in (W2), and how it was found.
#[derive(Debug, Clone, PartialEq)]
pub struct EnteredStore {
    /// The store.
    pub store: Store,
    /// Great-circle distance from the point, metres, when found by position.
    pub distance_m: Option<f64>,
    /// Other stores at exactly the same distance (the store chosen is the lowest ID).
    pub tied: Vec<String>,
    /// The networks an EMVCo merchant-presented poster names (tags 26–51), when found by one.
    pub qr_networks: Vec<String>,
}

impl Engine {
    /// Adds a store, or replaces the store with the same ID (W1). The store lives in the shard
    /// that owns its position's cell; a store that moves to another shard's cell is added
    /// there first and then removed from the old one.
    pub async fn upsert_store(
        &self,
        client_request_id: RequestId,
        store: Store,
    ) -> Result<(), EngineError> {
        store.validate().map_err(EngineError::Refused)?;
        let previous = self.inner.shared.stores.locate(&store.store_id);
        let owner_hash = cell_hash(store.cell());
        let digest = digest_of(&("store", format!("{store:?}")));
        let store_id = store.store_id.clone();
        // Resolved here, from the directory all shards share, so that the store's shard reads
        // nothing outside itself (two upserts racing for one signal can both pass, as before).
        let signals_free = Some(self.inner.shared.stores.signals_free(&store));
        let command = Command::UpsertStore { store: Box::new(store), signals_free };
        self.apply_for::<()>(owner_hash, Some(client_request_id), digest, command).await?;
        let shard = self.shard_of(owner_hash);
        if let Some((old_cell, _)) = previous {
            let old_hash = cell_hash(old_cell);
            if self.shard_of(old_hash) != shard {
                let command = Command::RemoveStore { store_id, moved: true };
                match self.apply_for::<()>(old_hash, None, 0, command).await {
                    Ok(()) | Err(EngineError::Refused(ReasonCode::UnknownStore)) => {}
                    Err(error) => return Err(error),
                }
            }
        }
        Ok(())
    }

    /// Removes a store (W1).
    pub async fn remove_store(
        &self,
        client_request_id: RequestId,
        store_id: &str,
    ) -> Result<(), EngineError> {
        let (cell, _) = self
            .inner
            .shared
            .stores
            .locate(store_id)
            .ok_or(EngineError::Refused(ReasonCode::UnknownStore))?;
        let owner_hash = cell_hash(cell);
        let command = Command::RemoveStore { store_id: store_id.to_owned(), moved: false };
        let digest = digest_of(&("remove-store", store_id));
        self.apply_for(owner_hash, Some(client_request_id), digest, command).await
    }

    /// The store a device at a GPS position is in (W2): the nearest store within `radius_m`
    /// (1..=50,000) by great-circle distance. Ties go to the lowest store ID and are listed.
    pub async fn store_at(
        &self,
        latitude: f64,
        longitude: f64,
        radius_m: u32,
    ) -> Result<EnteredStore, EngineError> {
        let valid = latitude.is_finite()
            && longitude.is_finite()
            && (-90.0..=90.0).contains(&latitude)
            && (-180.0..=180.0).contains(&longitude)
            && (1..=STORE_RADIUS_MAX_M).contains(&radius_m);
        if !valid {
            return Err(EngineError::Refused(ReasonCode::InvalidPosition));
        }
        let mut shards: Vec<usize> = geo::covering_cells(latitude, longitude, f64::from(radius_m))
            .into_iter()
            .map(|cell| self.shard_of(cell_hash(cell)))
            .collect();
        shards.sort_unstable();
        shards.dedup();
        let position = geo::unit_vector(latitude, longitude);
        let max_chord = geo::metres_to_chord(f64::from(radius_m));
        let replies = join_all(shards.into_iter().map(|shard| {
            let query = Query::NearestStores { position, max_chord };
            self.call::<Vec<Candidate>>(shard, Op::Query(query))
        }))
        .await;
        let mut candidates: Vec<Candidate> = Vec::new();
        for found in replies {
            candidates.extend(found?);
        }
        // Distances are compared as the protocol reports them, in whole millimetres, so that
        // stores placed symmetrically tie whatever the last bits of the arithmetic say.
        let millimetres = |c: &Candidate| (geo::chord_to_metres(c.chord) * 1000.0).round() as u64;
        let best = candidates.iter().map(millimetres).min();
        let mut nearest: Vec<Candidate> =
            candidates.into_iter().filter(|c| Some(millimetres(c)) == best).collect();
        nearest.sort_by(|a, b| a.store.store_id.cmp(&b.store.store_id));
        let mut nearest = nearest.into_iter();
        let chosen = nearest.next().ok_or(EngineError::Refused(ReasonCode::NoStoreInRange))?;
        Ok(EnteredStore {
            distance_m: Some(geo::chord_to_metres(chosen.chord)),
            store: chosen.store,
            tied: nearest.map(|c| c.store.store_id).collect(),
            qr_networks: Vec::new(),
        })
    }

    /// The store a beacon, Wi-Fi ID or QR poster names (W2). A poster in EMVCo
    /// merchant-presented format must pass its CRC check; the networks it names are returned.
    pub async fn store_by_signal(
        &self,
        signal: Signal,
        id: &str,
    ) -> Result<EnteredStore, EngineError> {
        let qr_networks = if signal == Signal::QrPoster && crate::emvqr::is_mpm(id) {
            crate::emvqr::parse(id)
                .map_err(|_| EngineError::Refused(ReasonCode::InvalidQrCode))?
                .networks
        } else {
            Vec::new()
        };
        let (store_id, cell) = self
            .inner
            .shared
            .stores
            .resolve(signal, id)
            .ok_or(EngineError::Refused(ReasonCode::UnknownStore))?;
        let store = self.store_in_cell(&store_id, cell).await?;
        Ok(EnteredStore { store, distance_m: None, tied: Vec::new(), qr_networks })
    }

    /// A store by ID.
    pub async fn store(&self, store_id: &str) -> Result<Store, EngineError> {
        let (cell, _) = self
            .inner
            .shared
            .stores
            .locate(store_id)
            .ok_or(EngineError::Refused(ReasonCode::UnknownStore))?;
        self.store_in_cell(store_id, cell).await
    }

    async fn store_in_cell(&self, store_id: &str, cell: u32) -> Result<Store, EngineError> {
        let query = Query::Store { store_id: store_id.to_owned() };
        let store: Box<Store> = self.call(self.shard_of(cell_hash(cell)), Op::Query(query)).await?;
        Ok(*store)
    }
}
