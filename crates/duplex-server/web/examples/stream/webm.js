// Cuts a live WebM byte stream (MediaRecorder's) into what a late viewer needs: the
// initialisation segment (everything before the first Cluster: EBML header, Segment, Info,
// Tracks) and then one piece per Cluster. MediaRecorder writes Clusters of unknown size, so a
// Cluster ends where the next one begins: the cutter walks the Cluster's children by their
// sizes (never by searching the bytes for an id, which frame data may hold by chance).

const EBML = 0x1a45dfa3;
const SEGMENT = 0x18538067;
const CLUSTER = 0x1f43b675;

/** An element header at `pos`: its id, its size (null when unknown) and the header's length;
 * null when the bytes are not there yet. */
function header(bytes, pos) {
  if (pos >= bytes.length) return null;
  const idLength = leadingZeros(bytes[pos]) + 1;
  if (idLength > 4) throw new Error(`not WebM: an element id of ${idLength} bytes at ${pos}`);
  if (pos + idLength >= bytes.length) return null;
  let id = 0;
  for (let i = 0; i < idLength; i++) id = id * 256 + bytes[pos + i];
  const sizeAt = pos + idLength;
  const sizeLength = leadingZeros(bytes[sizeAt]) + 1;
  if (sizeLength > 8) throw new Error(`not WebM: a size of ${sizeLength} bytes at ${sizeAt}`);
  if (sizeAt + sizeLength > bytes.length) return null;
  let size = bytes[sizeAt] & (0xff >> sizeLength);
  let allOnes = size === 0xff >> sizeLength;
  for (let i = 1; i < sizeLength; i++) {
    size = size * 256 + bytes[sizeAt + i];
    allOnes = allOnes && bytes[sizeAt + i] === 0xff;
  }
  return { id, size: allOnes ? null : size, length: idLength + sizeLength };
}

function leadingZeros(byte) {
  let n = 0;
  while (n < 8 && (byte & (0x80 >> n)) === 0) n += 1;
  return n;
}

function concat(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}

export class WebmCutter {
  /** `onInit(bytes)` once, then `onCluster(bytes)` for every whole Cluster, in order. */
  constructor({ onInit, onCluster }) {
    this.onInit = onInit;
    this.onCluster = onCluster;
    this.bytes = new Uint8Array(0);
    this.initDone = false;
    // Where the walk inside the current (unknown-size) Cluster got to.
    this.walked = 0;
  }

  /** Takes the next bytes of the stream. */
  push(chunk) {
    this.bytes = concat(this.bytes, chunk);
    if (!this.initDone && !this.cutInit()) return;
    this.cutClusters();
  }

  /** What is left when the recorder stops: the last Cluster. */
  flush() {
    if (this.initDone && this.bytes.length > 0) this.onCluster(this.bytes);
    this.bytes = new Uint8Array(0);
  }

  cutInit() {
    const bytes = this.bytes;
    const ebml = header(bytes, 0);
    if (!ebml) return false;
    if (ebml.id !== EBML) throw new Error("not WebM: no EBML header");
    let pos = ebml.length + ebml.size;
    const segment = header(bytes, pos);
    if (!segment) return false;
    if (segment.id !== SEGMENT) throw new Error("not WebM: no Segment");
    pos += segment.length;
    for (;;) {
      const element = header(bytes, pos);
      if (!element) return false;
      if (element.id === CLUSTER) break;
      if (element.size === null) throw new Error("not WebM: an element of unknown size before the first Cluster");
      if (pos + element.length + element.size > bytes.length) return false;
      pos += element.length + element.size;
    }
    this.onInit(bytes.slice(0, pos));
    this.bytes = bytes.slice(pos);
    this.initDone = true;
    this.walked = 0;
    return true;
  }

  cutClusters() {
    for (;;) {
      const bytes = this.bytes;
      const cluster = header(bytes, 0);
      if (!cluster) return;
      if (cluster.id !== CLUSTER) {
        // Cues or another trailer when the recording ends: not media, not needed live.
        if (cluster.size === null || cluster.length + cluster.size > bytes.length) return;
        this.bytes = bytes.slice(cluster.length + cluster.size);
        continue;
      }
      if (cluster.size !== null) {
        const end = cluster.length + cluster.size;
        if (end > bytes.length) return;
        this.onCluster(bytes.slice(0, end));
        this.bytes = bytes.slice(end);
        this.walked = 0;
        continue;
      }
      let pos = Math.max(this.walked, cluster.length);
      for (;;) {
        const child = header(bytes, pos);
        if (!child || (child.id !== CLUSTER && child.size !== null && pos + child.length + child.size > bytes.length)) {
          this.walked = pos;
          return;
        }
        if (child.id === CLUSTER) break;
        if (child.size === null) throw new Error("not WebM: a Cluster child of unknown size");
        pos += child.length + child.size;
      }
      this.onCluster(bytes.slice(0, pos));
      this.bytes = bytes.slice(pos);
      this.walked = 0;
    }
  }
}
