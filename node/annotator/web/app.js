// The annotator's screens: login, worklist, case (viewer, tools, labels, versions,
// proposals), and for reviewers the raters' versions overlaid, the case's agreement,
// adjudication and returning a case. Every permission is checked again by the server.

import { api, enc, ApiError } from '/app/api.js';
import { Viewer, PRESETS } from '/app/viewer.js';

const app = document.getElementById('app');
const state = { me: null, viewer: null };
window.fedcurate = state; // for the browser tests and the curious

function h(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (v === true) e.setAttribute(k, '');
    else if (v !== false && v !== null && v !== undefined) e.setAttribute(k, v);
  }
  for (const c of children.flat()) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function fmt(x, digits = 3) {
  return x === null || x === undefined ? '–' : Number(x).toFixed(digits);
}

async function whoAmI() {
  try {
    state.me = await api('/api/me');
  } catch (e) {
    state.me = null;
  }
  const who = document.getElementById('who');
  who.replaceChildren();
  if (state.me) {
    who.append(`${state.me.user} (${state.me.role}) `, h('button', { id: 'logout', onclick: logout }, 'Log out'));
  }
}

async function logout() {
  await api('/api/logout', { method: 'POST' }).catch(() => {});
  state.me = null;
  location.hash = '#/login';
  await route();
}

function loginScreen(message) {
  const user = h('input', { id: 'user', name: 'user', autocomplete: 'username', required: true });
  const password = h('input', { id: 'password', name: 'password', type: 'password', autocomplete: 'current-password', required: true });
  const out = h('p', { class: 'error', id: 'login-error' }, message || '');
  const form = h('form', { class: 'login', id: 'login' },
    h('h2', {}, 'Log in'), h('label', {}, 'User', user), h('label', {}, 'Password', password),
    h('button', { class: 'primary', type: 'submit' }, 'Log in'), out);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    try {
      await api('/api/login', { method: 'POST', json: { user: user.value, password: password.value } });
      location.hash = '#/';
      await route();
    } catch (err) {
      out.textContent = err.message;
    }
  });
  app.replaceChildren(form);
  user.focus();
}

async function worklist() {
  const { projects } = await api('/api/projects');
  const body = [h('h2', {}, 'Worklist')];
  if (!projects.length) body.push(h('p', { class: 'muted' }, 'Nothing is assigned to you yet.'));
  for (const p of projects) {
    const { cases } = await api(`/api/projects/${enc(p.id)}/cases`);
    const rows = cases.map((c) => {
      const states = c.assignments.map((a) => `${state.me.role === 'annotator' ? '' : `${a.rater}: `}${a.state}${a.repeat > 1 ? ` (#${a.repeat})` : ''}`).join(', ');
      return h('tr', { 'data-case': c.case },
        h('td', {}, h('a', { href: `#/p/${enc(p.id)}/c/${enc(c.case)}`, class: 'open-case' }, c.case)),
        h('td', {}, c.modality), h('td', {}, states || '–'),
        state.me.role === 'annotator' ? '' : h('td', {}, c.consensus ? 'yes' : '–'));
    });
    body.push(h('section', { class: 'project', 'data-project': p.id },
      h('h3', {}, `${p.id} `, h('span', { class: 'muted' }, `${p.labels.map((l) => l.name).join(', ')} · ${p.kinds.join(', ')}${p.blinded ? ' · blinded' : ''}`)),
      state.me.role === 'admin' ? await adminTools(p) : '',
      h('table', {}, h('thead', {}, h('tr', {}, h('th', {}, 'Case'), h('th', {}, 'Modality'), h('th', {}, 'Assignments'),
        state.me.role === 'annotator' ? '' : h('th', {}, 'Consensus'))), h('tbody', {}, rows))));
  }
  if (state.me.role === 'admin') {
    const { users } = await api('/api/users');
    body.push(h('section', { id: 'users' }, h('h3', {}, 'Users'),
      h('table', {}, users.map((u) => h('tr', {}, h('td', {}, u.user), h('td', {}, u.role), h('td', {}, u.disabled ? 'disabled' : 'active'))))));
  }
  app.replaceChildren(...body);
}

// An admin's tools for a project: its progress, assigning raters, exporting.
async function adminTools(p) {
  const st = await api(`/api/projects/${enc(p.id)}/status`);
  const out = h('span', { class: 'muted admin-out' }, '');
  const raters = h('input', { class: 'assign-raters', placeholder: 'raters, comma-separated', size: 28 });
  const assign = h('button', { class: 'assign', onclick: async () => {
    try {
      const r = await api(`/api/projects/${enc(p.id)}/assign`, { method: 'POST', json: { raters: raters.value.split(',').map((x) => x.trim()).filter(Boolean) } });
      out.textContent = `${r.assigned} new assignments.`;
    } catch (e) { out.textContent = e.message; }
  } }, 'Assign');
  const exp = h('button', { class: 'export', onclick: async () => {
    try {
      const r = await api(`/api/projects/${enc(p.id)}/export`, { method: 'POST' });
      out.textContent = `Exported ${r.versions} version${r.versions === 1 ? "" : "s"} to ${r.folder}.`;
    } catch (e) { out.textContent = e.message; }
  } }, 'Export');
  return h('div', { class: 'tools admin' },
    h('span', { class: 'muted status-line' }, `${st.cases} cases · ${st.assignments} assignments · ${st.submitted} submitted · ${st.returned} returned · ${st.versions} versions · consensus on ${st.consensus_cases}`),
    raters, assign, exp, out);
}

async function caseScreen(project, caseId) {
  const info = await api(`/api/projects/${enc(project)}/cases/${enc(caseId)}`);
  const reviewer = state.me.role !== 'annotator';
  const kinds = new Set(info.project.kinds);
  const stage = h('div', { class: 'stage', id: 'stage' });
  const status = h('p', { class: 'status', id: 'status' }, 'Loading the image…');
  const side = h('div', { class: 'side' });
  const statusSection = h('section', { id: 'status-section' }, status);
  side.append(statusSection);
  app.replaceChildren(h('div', { class: 'case', 'data-case': caseId }, stage, side));

  if (state.viewer) state.viewer.dispose();
  const viewer = new Viewer(stage, {
    onChange: (what) => {
      const input = document.getElementById('landmark-name');
      if (what === 'vectors' && input) input.value = viewer.landmarkName;
    },
  });
  state.viewer = viewer;
  const t0 = performance.now();
  try {
    await viewer.open(info, `/api/projects/${enc(project)}/cases/${enc(caseId)}/image.nii`);
  } catch (e) {
    status.textContent = `The image could not be shown: ${e.message || e}`;
    status.className = 'status error';
    throw e;
  }
  state.loadMs = performance.now() - t0;
  status.textContent = `Image shown in ${Math.round(state.loadMs)} ms.`;
  status.dataset.ready = '1';

  // What the user works on: the version continued, and the proposal acted on.
  const work = { parent: null, proposal: null, start: 'edit', labels: new Set() };
  const mine = info.versions.filter((v) => v.rater === state.me.user);
  const repeat = (info.assignments.find((a) => a.rater === state.me.user) || { repeat: 1 }).repeat;

  async function loadVersion(v, { vectorsOnly = false } = {}) {
    const full = await api(`/api/versions/${v.id}`);
    viewer.setVectors(full.content);
    if (!vectorsOnly) {
      if (v.has_mask) await viewer.loadMask(`/api/versions/${v.id}/mask.nii.gz`);
      else viewer.clearMask();
    }
    work.labels = new Set((full.content.labels || []).flatMap((l) => l.level === 'case' ? l.classes : []));
    renderClassification();
    return full;
  }
  if (mine.length) {
    const last = mine[mine.length - 1];
    await loadVersion(last);
    work.parent = last.id;
  }

  // Tools.
  const tools = [['navigate', 'Navigate', 'n']];
  if (kinds.has('mask')) tools.push(['brush', 'Brush', 'b'], ['eraser', 'Eraser', 'e'], ['fill', 'Fill outline', 'f']);
  if (kinds.has('box2d')) tools.push(['box', 'Box', 'x']);
  if (kinds.has('polygon')) tools.push(['polygon', 'Polygon', 'p']);
  if (kinds.has('polyline')) tools.push(['polyline', 'Polyline', 'l']);
  if (kinds.has('landmark')) tools.push(['landmark', 'Landmark', 'm']);
  const toolButtons = tools.map(([name, title, key]) => h('button', { 'data-tool': name, title: `${title} (${key})`, 'aria-pressed': name === 'navigate' ? 'true' : 'false', onclick: () => selectTool(name) }, title));
  function selectTool(name) {
    viewer.setTool(name);
    for (const b of toolButtons) b.setAttribute('aria-pressed', b.dataset.tool === name ? 'true' : 'false');
  }
  const brush = h('input', { id: 'brush-mm', type: 'number', min: '0.5', max: '50', step: '0.5', value: String(viewer.brushMM) });
  brush.addEventListener('change', () => viewer.setBrushMM(Number(brush.value)));
  const landmarkName = h('input', { id: 'landmark-name', value: viewer.landmarkName, size: 6 });
  landmarkName.addEventListener('change', () => { viewer.landmarkName = landmarkName.value.trim() || 'L1'; });

  const presetSet = info.modality === 'CT' ? PRESETS.CT : PRESETS.MR;
  const preset = h('select', { id: 'preset' }, Object.keys(presetSet).map((n) => h('option', { value: n }, n)));
  preset.addEventListener('change', () => {
    const p = presetSet[preset.value];
    if (Array.isArray(p)) viewer.preset(p[0], p[1]); else viewer.preset(p, null);
  });
  const rightDrag = h('select', { id: 'right-drag', title: 'What a right drag does' },
    h('option', { value: 'contrast' }, 'Right drag: window/level'), h('option', { value: 'pan' }, 'Right drag: pan'));
  rightDrag.addEventListener('change', () => viewer.setRightDrag(rightDrag.value));
  const layout = h('select', { id: 'layout' }, ['multiplanar', 'axial', 'coronal', 'sagittal', 'acquisition'].map((n) => h('option', { value: n }, n)));
  layout.addEventListener('change', () => viewer.setLayout(layout.value));

  side.append(h('section', {}, h('h3', {}, 'View'),
    h('div', { class: 'tools' }, layout, preset, rightDrag,
      h('button', { id: 'zoom-in', title: 'Zoom in (+)', onclick: () => viewer.zoom(1.25) }, '+'),
      h('button', { id: 'zoom-out', title: 'Zoom out (−)', onclick: () => viewer.zoom(0.8) }, '−')),
    h('p', { class: 'muted' }, 'Scroll: slices · right drag: window/level or pan · click: crosshair')));
  side.append(h('section', {}, h('h3', {}, 'Tools'), h('div', { class: 'tools' }, toolButtons),
    kinds.has('mask') ? h('p', {}, h('label', {}, 'Brush (mm) ', brush), ' ',
      h('button', { id: 'undo', title: 'Undo (Ctrl+Z)', onclick: () => viewer.undo() }, 'Undo'),
      h('button', { id: 'redo', title: 'Redo (Ctrl+Y)', onclick: () => viewer.redo() }, 'Redo')) : '',
    kinds.has('landmark') ? h('p', {}, h('label', {}, 'Landmark ', landmarkName)) : '',
    (kinds.has('polygon') || kinds.has('polyline')) ? h('p', { class: 'muted' }, 'Outlines: click points, double-click or Enter to finish, Esc to drop.') : '',
    h('button', { id: 'remove-vector', onclick: () => viewer.removeLastVector() }, 'Remove last shape')));

  // Labels.
  const labelInputs = info.project.labels.map((l, i) => h('label', {},
    h('input', { type: 'radio', name: 'label', value: String(l.value), checked: i === 0, onchange: () => viewer.setLabel(l.value) }),
    h('span', { class: 'swatch', 'data-colour': l.colour.join(',') }), `${i < 9 ? `${i + 1} ` : ''}${l.name}`));
  side.append(h('section', { class: 'labels' }, h('h3', {}, 'Label'), labelInputs));
  for (const s of side.querySelectorAll('.swatch')) s.style.background = `rgb(${s.dataset.colour})`;
  if (info.project.labels.length) viewer.setLabel(info.project.labels[0].value);

  // Classification of the case.
  const classification = h('section', { id: 'classification' });
  function renderClassification() {
    if (!kinds.has('label') && !kinds.has('multi-label')) return;
    const multi = kinds.has('multi-label');
    classification.replaceChildren(h('h3', {}, 'Classification (case)'),
      ...info.project.labels.map((l) => h('label', {}, h('input', {
        type: multi ? 'checkbox' : 'radio', name: 'case-class', value: String(l.value), checked: work.labels.has(l.value),
        onchange: (e) => {
          if (!multi) work.labels.clear();
          if (e.target.checked) work.labels.add(l.value); else work.labels.delete(l.value);
        },
      }), ` ${l.name}`)));
  }
  renderClassification();
  if (kinds.has('label') || kinds.has('multi-label')) side.append(classification);

  function content() {
    const c = { ...viewer.vectors };
    if (work.labels.size) c.labels = [{ level: 'case', classes: [...work.labels].sort((a, b) => a - b) }];
    return c;
  }

  async function submit(meta) {
    const form = new FormData();
    form.append('meta', new Blob([JSON.stringify(meta)], { type: 'application/json' }));
    const needsMask = meta.action !== 'accept' && meta.action !== 'reject';
    const bytes = needsMask ? await viewer.drawingBytes() : null;
    if (bytes) form.append('mask', new Blob([bytes], { type: 'application/gzip' }), 'mask.nii.gz');
    try {
      const r = await api(`/api/projects/${enc(project)}/cases/${enc(caseId)}/versions`, { method: 'POST', form });
      status.textContent = `Saved as version ${r.id}.`;
      status.className = 'status ok';
      status.dataset.version = String(r.id);
      work.parent = r.id;
      return r.id;
    } catch (e) {
      status.textContent = `Not saved: ${e.message}`;
      status.className = 'status error';
      return null;
    }
  }

  const assigned = info.assignments.some((a) => a.rater === state.me.user);
  const save = h('button', { class: 'primary', id: 'save', title: 'Save (Ctrl+S)', disabled: !assigned,
    onclick: () => work.proposal ? submit({ action: 'modify', proposal: work.proposal, repeat, content: content() })
      : submit({ action: 'save', repeat, parent: work.parent, content: content() }) }, 'Save');
  statusSection.prepend(assigned ? save : h('p', { class: 'muted' }, 'Not assigned to you: reviewers adjudicate below.'));
  side.append(statusSection);

  // Proposals.
  const proposals = info.versions.filter((v) => v.source === 'proposal');
  if (proposals.length && assigned) {
    const p = proposals[proposals.length - 1];
    side.append(h('section', { id: 'proposal' }, h('h3', {}, 'Model proposal'),
      h('p', {}, `${p.model || 'model'} ${p.model_version || ''} (version ${p.id})`),
      h('div', { class: 'tools' },
        h('button', { id: 'proposal-accept', onclick: () => submit({ action: 'accept', proposal: p.id, repeat }) }, 'Accept'),
        h('button', { id: 'proposal-modify', onclick: async () => { await loadVersion(p); work.proposal = p.id; status.textContent = 'Editing the proposal: Save records it as modified.'; } }, 'Modify'),
        h('button', { id: 'proposal-reject', onclick: () => submit({ action: 'reject', proposal: p.id, repeat }) }, 'Reject'))));
  }

  // Versions.
  side.append(h('section', { id: 'versions' }, h('h3', {}, 'Versions'),
    info.versions.length ? h('table', {}, info.versions.map((v) => h('tr', { 'data-version': String(v.id), 'data-source': v.source, 'data-rater': v.rater },
      h('td', {}, `#${v.id}`), h('td', {}, v.rater), h('td', {}, v.source + (v.model ? ` (${v.model} ${v.model_version || ''})` : '')),
      h('td', {}, h('button', { onclick: () => loadVersion(v) }, 'Load'))))) : h('p', { class: 'muted' }, 'None yet.')));

  if (reviewer) reviewPanel(info, project, caseId, viewer, side, work, status, loadVersion);

  document.onkeydown = (e) => {
    if (e.target instanceof HTMLInputElement && e.target.type !== 'radio' && e.target.type !== 'checkbox') return;
    const key = e.key.toLowerCase();
    if ((e.ctrlKey || e.metaKey) && key === 's') { e.preventDefault(); save.click(); return; }
    if ((e.ctrlKey || e.metaKey) && (key === 'y' || (key === 'z' && e.shiftKey))) { e.preventDefault(); viewer.redo(); return; }
    if ((e.ctrlKey || e.metaKey) && key === 'z') { e.preventDefault(); viewer.undo(); return; }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const tool = tools.find(([, , k]) => k === key);
    if (tool) { selectTool(tool[0]); return; }
    if (/^[1-9]$/.test(key) && labelInputs[Number(key) - 1]) { labelInputs[Number(key) - 1].querySelector('input').click(); return; }
    if (key === 'enter') viewer.finishOutline();
    if (key === 'escape') viewer.finishOutline(true);
    if (key === '+' || key === '=') viewer.zoom(1.25);
    if (key === '-') viewer.zoom(0.8);
    if (key === ']') { brush.value = String(Number(brush.value) + 0.5); viewer.setBrushMM(Number(brush.value)); }
    if (key === '[') { brush.value = String(Math.max(0.5, Number(brush.value) - 0.5)); viewer.setBrushMM(Number(brush.value)); }
  };
}

function reviewPanel(info, project, caseId, viewer, side, work, status, loadVersion) {
  const latest = new Map();
  for (const v of info.versions) if (v.source !== 'proposal' && v.rater !== 'consensus') latest.set(v.rater, v);
  const colours = ['red', 'green', 'blue', 'warm', 'cool'];
  const overlays = [...latest.values()].filter((v) => v.has_mask).map((v, i) => h('label', {},
    h('input', { type: 'checkbox', 'data-rater': v.rater, onchange: async (e) => {
      const url = `/api/versions/${v.id}/mask.nii.gz`;
      const nv = viewer.nv;
      if (e.target.checked) {
        await nv.addVolumeFromUrl({ url, name: `${v.rater}.nii.gz`, colormap: colours[i % colours.length], opacity: 0.45, cal_min: 0.5, cal_max: 1 });
      } else {
        const vol = nv.volumes.find((x) => x.name === `${v.rater}.nii.gz`);
        if (vol) nv.removeVolume(vol);
      }
    } }), ` ${v.rater} (#${v.id}, ${colours[i % colours.length]})`));

  const a = info.agreement || { masks: [], boxes: [], landmarks: [] };
  const agreementRows = [
    ...a.masks.map((m) => h('tr', {}, h('td', {}, m.raters.join(' · ')), h('td', {}, m.class),
      m.agreement.outcome === 'both'
        ? [h('td', { class: 'dice' }, `Dice ${fmt(m.agreement.dice)}`), h('td', {}, `HD95 ${fmt(m.agreement.hd95, 1)} mm`)]
        : [h('td', { colspan: 2 }, m.agreement.outcome === 'both-empty' ? 'both empty' : 'one empty')])),
    ...a.boxes.map((b) => h('tr', {}, h('td', {}, b.raters.join(' · ')), h('td', {}, `${b.class} boxes`), h('td', {}, `F1 ${fmt(b.f1)}`), h('td', {}, `IoU ${fmt(b.mean_iou)}`))),
    ...a.landmarks.map((l) => h('tr', {}, h('td', {}, l.raters.join(' · ')), h('td', {}, 'landmarks'),
      h('td', { colspan: 2 }, l.errors_mm.map(([name, mm]) => `${name} ${fmt(mm, 1)} mm`).join(', ')))),
  ];
  const start = h('select', { id: 'adjudicate-start' },
    h('option', { value: 'edit' }, 'Edit a rater\'s version'), h('option', { value: 'majority-vote' }, 'Majority vote'), h('option', { value: 'multi-label-staple' }, 'STAPLE'));
  const from = h('select', { id: 'adjudicate-from' }, [...latest.values()].map((v) => h('option', { value: String(v.id) }, `${v.rater} #${v.id}`)));
  const begin = h('button', { id: 'adjudicate-begin', onclick: async () => {
    work.start = start.value;
    if (start.value === 'edit') {
      const v = [...latest.values()].find((x) => String(x.id) === from.value);
      if (v) { await loadVersion(v); work.parent = v.id; }
    } else {
      const masks = [...latest.values()].filter((x) => x.has_mask);
      if (masks.length < 2) { status.textContent = 'The case needs at least two raters\' masks.'; return; }
      work.parent = Math.max(...masks.map((x) => x.id));
      await viewer.loadMask(`/api/projects/${enc(project)}/cases/${enc(caseId)}/consensus/${start.value}/start.nii.gz`);
    }
    status.textContent = `Adjudicating from ${start.value}: edit, then save the consensus.`;
  } }, 'Start');
  const saveConsensus = h('button', { class: 'primary', id: 'adjudicate-save', onclick: async () => {
    const form = new FormData();
    form.append('meta', new Blob([JSON.stringify({ action: 'adjudicate', start: work.start, parent: work.parent, content: { ...viewer.vectors } })], { type: 'application/json' }));
    const bytes = await viewer.drawingBytes();
    if (bytes) form.append('mask', new Blob([bytes], { type: 'application/gzip' }), 'consensus.nii.gz');
    try {
      const r = await api(`/api/projects/${enc(project)}/cases/${enc(caseId)}/versions`, { method: 'POST', form });
      status.textContent = `Consensus saved as version ${r.id}.`;
      status.className = 'status ok';
      status.dataset.version = String(r.id);
    } catch (e) {
      status.textContent = `Not saved: ${e.message}`;
      status.className = 'status error';
    }
  } }, 'Save consensus');
  const rater = h('select', { id: 'return-rater' }, info.assignments.map((x) => h('option', { value: `${x.rater}/${x.repeat}` }, `${x.rater} (${x.state})`)));
  const reason = h('input', { id: 'return-reason', placeholder: 'Reason' });
  const giveBack = h('button', { id: 'return', onclick: async () => {
    const [r, rep] = rater.value.split('/');
    try {
      await api(`/api/projects/${enc(project)}/cases/${enc(caseId)}/return`, { method: 'POST', json: { rater: r, repeat: Number(rep), reason: reason.value } });
      status.textContent = `Returned to ${r}.`;
    } catch (e) { status.textContent = e.message; }
  } }, 'Return');
  side.append(
    h('section', { id: 'overlays' }, h('h3', {}, 'Raters overlaid'), overlays.length ? overlays : h('p', { class: 'muted' }, 'No masks yet.')),
    h('section', { id: 'agreement' }, h('h3', {}, 'Agreement'), agreementRows.length ? h('table', {}, agreementRows) : h('p', { class: 'muted' }, 'Needs two raters.')),
    h('section', { id: 'adjudicate' }, h('h3', {}, 'Adjudicate'), h('div', { class: 'tools' }, start, from, begin, saveConsensus)),
    h('section', {}, h('h3', {}, 'Return to a rater'), h('div', { class: 'tools' }, rater, reason, giveBack)));
}

async function route() {
  document.onkeydown = null;
  await whoAmI();
  const hash = location.hash || '#/';
  if (!state.me) return loginScreen(hash === '#/login' ? '' : '');
  const m = /^#\/p\/([^/]+)\/c\/([^/]+)$/.exec(hash);
  try {
    if (m) await caseScreen(decodeURIComponent(m[1]), decodeURIComponent(m[2]));
    else await worklist();
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return loginScreen('Your session has ended: log in again.');
    app.replaceChildren(h('p', { class: 'error', id: 'page-error' }, e.message), h('p', {}, h('a', { href: '#/' }, 'Back to the worklist')));
  }
}

window.addEventListener('hashchange', route);
route();
