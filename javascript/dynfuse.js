// DynFuse: tooltips for every control (through the WebUI's hints: `titles`, and element titles), and
// "use as subject" / "use as style" actions on the Lora cards of the extra-networks tab.
(function() {
    "use strict";

    let counter = 0;

    function app() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    // The tips come from the FuseArgs field metadata, as JSON in a hidden element of each tab's accordion.
    function applyTips() {
        app().querySelectorAll(".dynfuse-tips-data").forEach(function(holder) {
            if (holder.dataset.dynfuseDone) return;
            let tips;
            try {
                tips = JSON.parse(holder.dataset.tips || "{}");
            } catch (e) {
                return;
            }
            Object.keys(tips).forEach(function(id) {
                const tip = tips[id];
                if (typeof titles === "object" && !(tip.label in titles)) {
                    titles[tip.label] = tip.tip; // the host's hints.js sets element titles from this table
                }
                const el = app().querySelector("#" + id);
                if (!el) return;
                if (el.classList.contains("input-accordion")) {
                    // the accordion holds every other control: only its own header gets this tip
                    const header = el.querySelector(".label-wrap");
                    if (header) header.title = tip.tip;
                    return;
                }
                el.title = tip.tip;
                el.querySelectorAll("label, span, input, textarea").forEach(function(n) {
                    if (!n.title) n.title = tip.tip;
                });
            });
            holder.dataset.dynfuseDone = "1";
        });
    }

    function sendCardAction(tab, role, name) {
        const box = app().querySelector("#dynfuse_" + tab + "_card_action textarea, #dynfuse_" + tab + "_card_action input");
        if (!box) return;
        counter += 1;
        box.value = role + "\n" + name + "\n" + counter;
        if (typeof updateInput === "function") {
            updateInput(box);
        } else {
            box.dispatchEvent(new Event("input", {bubbles: true}));
        }
        showGeneration(tab, role, name);
    }

    // After a card's action: back to the Generation tab (the first tab of `<tab>_extra_tabs`, modules/ui.py:272-275),
    // the DynFuse accordion open, the filled-in dropdown scrolled into view and flashed, and a short notice.
    function showGeneration(tab, role, name) {
        const first = app().querySelector("#" + tab + "_extra_tabs > div.tab-nav > button");
        if (first && !first.classList.contains("selected")) first.click();
        const id = "dynfuse_" + tab + "_enabled";
        const accordion = app().querySelector("#" + id);
        if (accordion && typeof inputAccordionChecked === "function" && accordion.visibleCheckbox &&
            !accordion.visibleCheckbox.checked) {
            inputAccordionChecked(id, true); // javascript/inputAccordion.js: opens it and sets the checkbox
        }
        notice("DynFuse: " + name + " is the " + role + " LoRA");
        setTimeout(function() { // the tab switch renders first; then the dropdown just filled in is shown
            const shown = app().querySelector("#dynfuse_" + tab + "_" + role) || app().querySelector("#" + id);
            if (!shown) return;
            shown.scrollIntoView({block: "center"});
            shown.classList.remove("dynfuse-flash");
            void shown.offsetWidth; // restart the animation
            shown.classList.add("dynfuse-flash");
        }, 150);
    }

    function notice(text) {
        let box = document.querySelector(".dynfuse-notice");
        if (!box) {
            box = document.createElement("div");
            box.className = "dynfuse-notice";
            box.setAttribute("role", "status");
            document.body.appendChild(box);
        }
        box.textContent = text;
        box.classList.add("dynfuse-notice-shown");
        clearTimeout(box.dynfuseTimer);
        box.dynfuseTimer = setTimeout(function() { box.classList.remove("dynfuse-notice-shown"); }, 3000);
    }

    function cardButton(tab, role, name) {
        const button = document.createElement("div");
        button.className = "dynfuse-card-action";
        button.textContent = role === "subject" ? "DF subject" : "DF style";
        button.title = "DynFuse: use this LoRA as the " + role + " LoRA (fills the DynFuse accordion, opens it and " +
            "goes back to the Generation tab)";
        button.addEventListener("click", function(event) {
            event.stopPropagation(); // the card's own click would add <lora:...> to the prompt
            event.preventDefault();
            sendCardAction(tab, role, name);
        });
        return button;
    }

    function addCardActions() {
        ["txt2img", "img2img"].forEach(function(tab) {
            if (!app().querySelector("#dynfuse_" + tab + "_card_action")) return;
            app().querySelectorAll("#" + tab + "_lora_cards_html .card").forEach(function(card) {
                if (card.dataset.dynfuse || !card.dataset.name) return;
                card.dataset.dynfuse = "1";
                const row = document.createElement("div");
                row.className = "dynfuse-card-actions";
                row.appendChild(cardButton(tab, "subject", card.dataset.name));
                row.appendChild(cardButton(tab, "style", card.dataset.name));
                card.appendChild(row);
            });
        });
    }

    function update() {
        applyTips();
        addCardActions();
    }

    if (typeof onUiLoaded === "function") onUiLoaded(update);
    if (typeof onUiUpdate === "function") onUiUpdate(update);
})();
