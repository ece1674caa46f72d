// The viewer: NiiVue for the volume and the label map (brush, eraser, filled outlines, undo
// and redo), and our own vector layer (boxes, polygons, polylines, landmarks) on a canvas
// over it. Vector coordinates are the image's own voxel indices (i, j, k), reached through
// world millimetres and the image's affine from the server, so they mean the same thing as
// in the exports whatever the volume's orientation.

import { Niivue, SLICE_TYPE, DRAG_MODE } from '/assets/niivue.js';

// Window/level presets: [centre, width]; `null` uses the volume's robust range.
export const PRESETS = {
  CT: { 'Soft tissue': [40, 400], Brain: [40, 80], Lung: [-600, 1500], Bone: [400, 1800], Liver: [60, 160] },
  MR: { Auto: null, 'Auto (wide)': 'wide' },
};

function invert(a) {
  // The inverse of a 3x4 affine (rows), as a 3x4.
  const [m00, m01, m02, t0] = a[0];
  const [m10, m11, m12, t1] = a[1];
  const [m20, m21, m22, t2] = a[2];
  const det = m00 * (m11 * m22 - m12 * m21) - m01 * (m10 * m22 - m12 * m20) + m02 * (m10 * m21 - m11 * m20);
  const inv = [
    [(m11 * m22 - m12 * m21) / det, (m02 * m21 - m01 * m22) / det, (m01 * m12 - m02 * m11) / det],
    [(m12 * m20 - m10 * m22) / det, (m00 * m22 - m02 * m20) / det, (m02 * m10 - m00 * m12) / det],
    [(m10 * m21 - m11 * m20) / det, (m01 * m20 - m00 * m21) / det, (m00 * m11 - m01 * m10) / det],
  ];
  return inv.map((row) => [...row, -(row[0] * t0 + row[1] * t1 + row[2] * t2)]);
}

function apply(a, p) {
  return [0, 1, 2].map((r) => a[r][0] * p[0] + a[r][1] * p[1] + a[r][2] * p[2] + a[r][3]);
}

export class Viewer {
  constructor(stage, { onChange } = {}) {
    this.stage = stage;
    this.onChange = onChange || (() => {});
    this.canvas = document.createElement('canvas');
    this.overlay = document.createElement('canvas');
    this.overlay.className = 'overlay';
    stage.append(this.canvas, this.overlay);
    this.nv = new Niivue({
      backColor: [0, 0, 0, 1],
      show3Dcrosshair: false,
      multiplanarShowRender: 0, // three planes, no 3D rendering tile
      dragMode: DRAG_MODE.contrast,
      isRadiologicalConvention: false,
      logLevel: 'error',
      penSize: 1,
      maxDrawUndoBitmaps: 16,
      crosshairColor: [0.3, 0.8, 1, 0.7],
      crosshairWidth: 0.25,
    });
    this.tool = 'navigate';
    this.label = 1;
    this.brushMM = 2;
    this.redoable = 0;
    this.vectors = { boxes: [], outlines: [], landmarks: [] };
    this.pending = null; // a polygon or polyline being drawn, or a box being dragged
    this.landmarkName = 'L1';
    this.overlay.addEventListener('pointerdown', (e) => this.pointerDown(e));
    this.overlay.addEventListener('pointermove', (e) => this.pointerMove(e));
    this.overlay.addEventListener('pointerup', (e) => this.pointerUp(e));
    this.overlay.addEventListener('dblclick', () => this.finishOutline());
    this.overlay.addEventListener('wheel', (e) => {
      // Scrolling through slices works in the vector tools too.
      e.preventDefault();
      this.nv.moveCrosshairInVox(0, 0, e.deltaY > 0 ? -1 : 1);
      this.redraw();
    }, { passive: false });
  }

  // Give the WebGL context back when the screen is left (browsers keep only a few).
  dispose() {
    const gl = this.nv.gl;
    const lose = gl && gl.getExtension('WEBGL_lose_context');
    if (lose) lose.loseContext();
    this.canvas.remove();
    this.overlay.remove();
  }

  async open(caseInfo, imageUrl) {
    this.info = caseInfo;
    this.affine = caseInfo.grid.affine;
    this.inverse = invert(this.affine);
    await this.nv.attachToCanvas(this.canvas);
    // Colours first: setting them after the volume would make NiiVue prepare it again.
    this.setLabels(caseInfo.project.labels);
    await this.nv.loadVolumes([{ url: imageUrl, name: `${caseInfo.case}.nii` }]);
    this.nv.setSliceType(SLICE_TYPE.MULTIPLANAR);
    this.nv.onLocationChange = () => { this.redraw(); this.onChange('location'); };
    this.nv.onDrawingChanged = (action) => {
      if (action !== 'undo') this.redoable = 0;
      this.onChange('drawing');
    };
    // The drawing is made when a painting tool is first chosen (or a mask loaded).
    this.applyBrush();
    this.redraw();
  }

  setLabels(labels) {
    if (!labels) return;
    // The drawing colours: label value v gets the project's colour.
    const I = [0], R = [0], G = [0], B = [0], A = [0], names = ['background'];
    for (const l of labels) {
      I.push(l.value); R.push(l.colour[0]); G.push(l.colour[1]); B.push(l.colour[2]); A.push(255); names.push(l.name);
    }
    this.nv.setDrawColormap({ R, G, B, A, I, labels: names });
    this.nv.setDrawOpacity(0.6);
  }

  // World millimetres of the crosshair, and its voxel in the image's own order.
  crosshairVoxel() {
    const mm = this.nv.frac2mm(this.nv.scene.crosshairPos, 0, true);
    return apply(this.inverse, [mm[0], mm[1], mm[2]]);
  }

  voxelToCanvas(v) {
    const mm = apply(this.affine, v);
    const frac = this.nv.mm2frac(mm, 0, true);
    const pos = this.nv.frac2canvasPos(frac);
    return pos && pos.length >= 2 && pos[0] >= 0 ? pos : null;
  }

  canvasToVoxel(x, y) {
    const frac = this.nv.canvasPos2frac([x, y]);
    if (!frac || frac[0] < 0) return null;
    const mm = this.nv.frac2mm(frac, 0, true);
    return apply(this.inverse, [mm[0], mm[1], mm[2]]);
  }

  // The plane of the acquisition (native k): the view the vector tools draw in.
  acquisitionPlane() {
    const c = [0, 1, 2].map((r) => Math.abs(this.affine[r][2]));
    const axis = c.indexOf(Math.max(...c));
    return [SLICE_TYPE.SAGITTAL, SLICE_TYPE.CORONAL, SLICE_TYPE.AXIAL][axis];
  }

  setLayout(name) {
    const types = { axial: SLICE_TYPE.AXIAL, coronal: SLICE_TYPE.CORONAL, sagittal: SLICE_TYPE.SAGITTAL, multiplanar: SLICE_TYPE.MULTIPLANAR };
    this.nv.setSliceType(name === 'acquisition' ? this.acquisitionPlane() : types[name]);
    this.redraw();
  }

  // What a right drag does: window/level, or pan.
  setRightDrag(mode) {
    this.nv.opts.dragMode = mode === 'pan' ? DRAG_MODE.pan : DRAG_MODE.contrast;
  }

  zoom(factor) {
    const p = this.nv.scene.pan2Dxyzmm;
    this.nv.setPan2Dxyzmm([p[0], p[1], p[2], Math.max(0.25, Math.min(16, p[3] * factor))]);
    this.redraw();
  }

  preset(centre, width) {
    const v = this.nv.volumes[0];
    if (centre === null) {
      v.cal_min = v.robust_min; v.cal_max = v.robust_max;
    } else if (centre === 'wide') {
      v.cal_min = v.global_min; v.cal_max = v.global_max;
    } else {
      v.cal_min = centre - width / 2; v.cal_max = centre + width / 2;
    }
    this.nv.updateGLVolume();
  }

  // Tools: navigate, brush, eraser, fill (a filled outline), box, polygon, polyline, landmark.
  setTool(tool) {
    this.finishOutline(true);
    this.tool = tool;
    const painting = ['brush', 'eraser', 'fill'].includes(tool);
    const vector = ['box', 'polygon', 'polyline', 'landmark'].includes(tool);
    this.nv.setDrawingEnabled(painting);
    if (painting) {
      this.nv.setPenValue(tool === 'eraser' ? 0 : this.label, tool === 'fill');
    }
    this.overlay.classList.toggle('active', vector);
    if (vector && this.nv.opts.sliceType !== this.acquisitionPlane()) this.setLayout('acquisition');
    this.applyBrush();
    this.redraw();
  }

  setLabel(value) {
    this.label = value;
    if (this.tool === 'brush' || this.tool === 'fill') this.nv.setPenValue(value, this.tool === 'fill');
  }

  setBrushMM(mm) {
    this.brushMM = mm;
    this.applyBrush();
  }

  applyBrush() {
    if (!this.info) return;
    const s = this.info.grid.spacing;
    const inPlane = Math.min(s[0], s[1]);
    this.nv.opts.penSize = Math.max(1, Math.round(this.brushMM / inPlane));
  }

  undo() {
    if (!this.nv.drawBitmap) return;
    this.nv.drawUndo();
    this.redoable += 1;
  }

  // NiiVue keeps its undo states in a ring; after an undo the newer state is still there.
  redo() {
    if (this.redoable < 1 || !this.nv.drawBitmap) return;
    const n = this.nv.drawUndoBitmaps.length;
    this.nv.currentDrawUndoBitmap = (this.nv.currentDrawUndoBitmap + 2) % n;
    this.nv.drawUndo();
    this.redoable -= 1;
  }

  // The drawing as NIfTI bytes in the image's own voxel order (NiiVue converts from its
  // RAS-ordered bitmap), or null when nothing is painted.
  // Gzipped in the browser (natively): a label map is mostly zeros, so the upload is small.
  async drawingBytes() {
    const bmp = this.nv.drawBitmap;
    if (!bmp || !bmp.some((x) => x !== 0)) return null;
    const raw = await this.nv.saveImage({ filename: '', isSaveDrawing: true, volumeByIndex: 0 });
    const stream = new Blob([raw]).stream().pipeThrough(new CompressionStream('gzip'));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  async loadMask(url) {
    const ok = await this.nv.loadDrawingFromUrl(url);
    this.redoable = 0;
    this.redraw();
    return ok;
  }

  clearMask() {
    if (this.nv.drawBitmap) this.nv.createEmptyDrawing();
    this.setTool(this.tool);
  }

  paintedVoxels() {
    const bmp = this.nv.drawBitmap;
    let n = 0;
    if (bmp) for (let i = 0; i < bmp.length; i++) if (bmp[i] !== 0) n++;
    return n;
  }

  setVectors(content) {
    this.vectors = {
      boxes: (content.boxes || []).map((b) => ({ ...b })),
      outlines: (content.outlines || []).map((o) => ({ ...o, points: o.points.map((p) => [...p]) })),
      landmarks: (content.landmarks || []).map((l) => ({ ...l })),
    };
    this.redraw();
  }

  // --- the vector layer ---

  dpr() {
    return this.nv.uiData && this.nv.uiData.dpr ? this.nv.uiData.dpr : window.devicePixelRatio || 1;
  }

  eventVoxel(e) {
    const r = this.overlay.getBoundingClientRect();
    const d = this.dpr();
    return this.canvasToVoxel((e.clientX - r.left) * d, (e.clientY - r.top) * d);
  }

  currentSlice() {
    return Math.round(this.crosshairVoxel()[2]);
  }

  pointerDown(e) {
    const v = this.eventVoxel(e);
    if (!v) return;
    const k = this.currentSlice();
    if (this.tool === 'box') {
      this.pending = { kind: 'box', a: v, b: v, k };
      this.overlay.setPointerCapture(e.pointerId);
    } else if (this.tool === 'polygon' || this.tool === 'polyline') {
      if (!this.pending || this.pending.kind !== this.tool) this.pending = { kind: this.tool, points: [], k };
      this.pending.points.push([v[0], v[1]]);
    } else if (this.tool === 'landmark') {
      this.vectors.landmarks = this.vectors.landmarks.filter((l) => l.name !== this.landmarkName);
      this.vectors.landmarks.push({ name: this.landmarkName, voxel: [v[0], v[1], k] });
      const m = /^(.*?)(\d+)$/.exec(this.landmarkName);
      if (m) this.landmarkName = `${m[1]}${Number(m[2]) + 1}`;
      this.onChange('vectors');
    }
    this.redraw();
  }

  pointerMove(e) {
    if (this.pending && this.pending.kind === 'box') {
      const v = this.eventVoxel(e);
      if (v) this.pending.b = v;
      this.redraw();
    }
  }

  pointerUp() {
    const p = this.pending;
    if (p && p.kind === 'box') {
      const min = [Math.min(p.a[0], p.b[0]), Math.min(p.a[1], p.b[1]), p.k];
      const max = [Math.max(p.a[0], p.b[0]), Math.max(p.a[1], p.b[1]), p.k];
      if (max[0] - min[0] > 0.5 && max[1] - min[1] > 0.5) {
        this.vectors.boxes.push({ class: this.label, slice: p.k, min, max });
        this.onChange('vectors');
      }
      this.pending = null;
      this.redraw();
    }
  }

  // Close the polygon or end the polyline being drawn (or drop it when `cancel`).
  finishOutline(cancel = false) {
    const p = this.pending;
    if (!p || (p.kind !== 'polygon' && p.kind !== 'polyline')) return;
    const closed = p.kind === 'polygon';
    if (!cancel && p.points.length >= (closed ? 3 : 2)) {
      this.vectors.outlines.push({ class: this.label, slice: p.k, closed, points: p.points });
      this.onChange('vectors');
    }
    this.pending = null;
    this.redraw();
  }

  removeLastVector() {
    const v = this.vectors;
    if (this.pending) { this.pending = null; }
    else if (v.landmarks.length && this.tool === 'landmark') v.landmarks.pop();
    else if (v.outlines.length && (this.tool === 'polygon' || this.tool === 'polyline')) v.outlines.pop();
    else if (v.boxes.length) v.boxes.pop();
    this.onChange('vectors');
    this.redraw();
  }

  colour(value) {
    const l = (this.info.project.labels || []).find((x) => x.value === value);
    return l ? `rgb(${l.colour.join(',')})` : '#ffcc00';
  }

  redraw() {
    if (!this.info) return;
    const c = this.overlay;
    if (c.width !== this.canvas.width || c.height !== this.canvas.height) {
      c.width = this.canvas.width;
      c.height = this.canvas.height;
    }
    const g = c.getContext('2d');
    g.clearRect(0, 0, c.width, c.height);
    if (this.nv.opts.sliceType !== this.acquisitionPlane()) return;
    const k = this.currentSlice();
    g.lineWidth = 2 * this.dpr();
    const path = (pts, closed) => {
      const q = pts.map((p) => this.voxelToCanvas([p[0], p[1], k])).filter(Boolean);
      if (q.length < 1) return;
      g.beginPath();
      g.moveTo(q[0][0], q[0][1]);
      for (const p of q.slice(1)) g.lineTo(p[0], p[1]);
      if (closed) g.closePath();
      g.stroke();
    };
    for (const b of this.vectors.boxes) {
      if (b.slice !== undefined && b.slice !== null && b.slice !== k) continue;
      g.strokeStyle = this.colour(b.class);
      path([[b.min[0], b.min[1]], [b.max[0], b.min[1]], [b.max[0], b.max[1]], [b.min[0], b.max[1]]], true);
    }
    for (const o of this.vectors.outlines) {
      if (o.slice !== k) continue;
      g.strokeStyle = this.colour(o.class);
      path(o.points, o.closed);
    }
    g.fillStyle = '#ffd400';
    g.font = `${12 * this.dpr()}px system-ui`;
    for (const l of this.vectors.landmarks) {
      if (Math.round(l.voxel[2]) !== k) continue;
      const p = this.voxelToCanvas(l.voxel);
      if (!p) continue;
      g.beginPath();
      g.arc(p[0], p[1], 4 * this.dpr(), 0, 2 * Math.PI);
      g.fill();
      g.fillText(l.name, p[0] + 6 * this.dpr(), p[1] - 6 * this.dpr());
    }
    const p = this.pending;
    if (p) {
      g.strokeStyle = this.colour(this.label);
      g.setLineDash([6, 4]);
      if (p.kind === 'box') path([[p.a[0], p.a[1]], [p.b[0], p.a[1]], [p.b[0], p.b[1]], [p.a[0], p.b[1]]], true);
      else path(p.points, false);
      g.setLineDash([]);
    }
  }
}
